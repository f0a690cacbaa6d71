//go:build integration

package loopctl

import (
	"os"
	"testing"

	"github.com/loopctl/loopctl/internal/testlock"
)

// TestMain runs the integration tests in turn with those of the module's
// other packages (see internal/testlock).
func TestMain(m *testing.M) {
	os.Exit(testlock.Run(m))
}
