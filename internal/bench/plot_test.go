package main

import (
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
		{bound: 8, getFree: 300, scanC: 10e3, scanGo: 11e3, list: 360e3, listC: 385e3, losetup: 1.5e6},
		{bound: 64, getFree: 990, scanC: 80e3, scanGo: 86e3, list: 500e3, listC: 507e3, losetup: 3.6e6},
		{bound: 256, getFree: 3.5e3, scanC: 321e3, scanGo: 384e3, list: 965e3, listC: 1.05e6, losetup: 10e6},
		{bound: 1024, getFree: 13e3, scanC: 1.43e6, scanGo: 1.53e6, list: 3.7e6, listC: 4.5e6, losetup: 40e6},
	}}
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
	for _, name := range []string{scanPlot, listPlot, dataPlot, dataCachePlot} {
		if st, err := os.Stat(filepath.Join(dir, name)); err != nil || st.Size() == 0 {
			t.Errorf("%s: %v", name, err)
		}
	}
}
