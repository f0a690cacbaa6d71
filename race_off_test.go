//go:build !race

package loopctl

const raceEnabled = false
