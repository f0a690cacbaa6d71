package main

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// TestPlots draws every plot from made-up figures; with BENCH_PLOT_DIR
// set, it leaves them there to be looked at.
func TestPlots(t *testing.T) {
	dir := os.Getenv("BENCH_PLOT_DIR")
	if dir == "" {
		dir = t.TempDir()
	}
	old := *svgDir
	*svgDir = dir
	defer func() { *svgDir = old }()
	h := &harness{sweep: []sweepPoint{
		{bound: 8, getFree: 300, scanC: 10e3, scanGo: 11e3},
		{bound: 64, getFree: 990, scanC: 80e3, scanGo: 86e3},
		{bound: 256, getFree: 3.5e3, scanC: 321e3, scanGo: 384e3},
		{bound: 1024, getFree: 13e3, scanC: 1.43e6, scanGo: 1.53e6},
	}}
	h.points = []scalePoint{{16, 16}, {256, 256}, {4096, 4096}, {0, 4096}}
	for _, op := range scaleOps() {
		t := &scaleTable{op: op}
		for kind := rowLoopctl; kind <= rowEmptyGo; kind++ {
			r := &scaleRow{impl: fmt.Sprintf("row %d", kind), kind: kind}
			for i := range h.points {
				r.times = append(r.times, []float64{float64(kind+1) * 1e3 * float64(h.points[i].devices)})
			}
			t.rows = append(t.rows, r)
		}
		h.scaleTables = append(h.scaleTables, t)
	}
	for i, m := range dataModes {
		for _, fs := range []string{"ext4", "tmpfs"} {
			v := float64(500 * (i + 1))
			h.data = append(h.data, &dataRow{fs: fs, mode: m.name, seqRead: []float64{v}, seqWrite: []float64{v / 2},
				randRead: []float64{v * 10}, cached: []float64{256}, buffers: []float64{256}})
		}
	}
	if err := h.plots(); err != nil {
		t.Fatal(err)
	}
	if err := h.dataPlots(); err != nil {
		t.Fatal(err)
	}
	names := []string{scanPlot, dataPlot, dataCachePlot}
	for _, op := range scaleOps() {
		names = append(names, scalePlot(op.key))
	}
	for _, name := range names {
		if st, err := os.Stat(filepath.Join(dir, name)); err != nil || st.Size() == 0 {
			t.Errorf("%s: %v", name, err)
		}
	}
}
