// Package uevent reports what happens to loop devices, and waits for udev.
//
// The package loopctl makes and binds loop devices through the loop
// driver's ioctls; this package listens to another kernel interface, the
// uevents the kernel sends on a NETLINK_KOBJECT_UEVENT socket, and to what
// udev sends on after processing them. It imports loopctl; loopctl never
// imports it.
//
// A Monitor (Open, Next) reports loop devices added and removed, bound and
// unbound, resized, and their partitions added and removed, each event
// checked against sysfs. Where kernel uevents cannot arrive (a network
// namespace owned by a user namespace other than the machine's: a rootless
// container), it polls sysfs instead.
//
// WaitUdev waits until udev has processed a device's current binding, so
// that a program that binds an image and then mounts it by label finds
// /dev/disk/by-label/NAME in place.
//
// Errors follow loopctl's convention: each is, or wraps, a *loopctl.Error
// naming the operation, and its errno maps onto the same sentinels. Off
// Linux every call fails with an error matching errors.ErrUnsupported.
package uevent
