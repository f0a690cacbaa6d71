module github.com/loopctl/loopctl/internal/vmrun

go 1.26.0

require golang.org/x/sys v0.50.0
