//go:build !race && integration

package loopctl

const raceEnabled = false
