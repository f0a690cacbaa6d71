package main

import (
	"image/color"
	"path/filepath"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
)

// The plots, both time per operation against bound devices on log scales.
const (
	scanPlot = "getfree-vs-scan.svg"
	listPlot = "list-vs-losetup.svg"
)

func (h *harness) plots() error {
	type line struct {
		name string
		y    func(sweepPoint) float64
	}
	drawPlot := func(title, file string, lines []line) error {
		p := plot.New()
		p.Title.Text = title
		p.X.Label.Text = "bound loop devices"
		p.Y.Label.Text = "time per operation (µs)"
		p.X.Scale, p.Y.Scale = plot.LogScale{}, plot.LogScale{}
		p.X.Tick.Marker, p.Y.Tick.Marker = plot.LogTicks{Prec: -1}, plot.LogTicks{Prec: -1}
		p.Legend.Top, p.Legend.Left = true, true
		for i, l := range lines {
			xys := make(plotter.XYs, len(h.sweep))
			for j, s := range h.sweep {
				xys[j].X, xys[j].Y = float64(s.bound), l.y(s)/1e3
			}
			lp, pts, err := plotter.NewLinePoints(xys)
			if err != nil {
				return err
			}
			lp.Color = plotColors[i%len(plotColors)]
			pts.Color = lp.Color
			pts.Shape = plotShapes[i%len(plotShapes)]
			p.Add(lp, pts)
			p.Legend.Add(l.name, lp, pts)
		}
		p.Add(plotter.NewGrid())
		return p.Save(7*vg.Inch, 4.5*vg.Inch, filepath.Join(*svgDir, file))
	}
	if err := drawPlot("Finding a free loop device", scanPlot, []line{
		{"scan: open /dev/loopN + LOOP_GET_STATUS64 until ENXIO (C)", func(s sweepPoint) float64 { return s.scanC }},
		{"scan (Go, bare syscalls)", func(s sweepPoint) float64 { return s.scanGo }},
		{"loopctl Control.GetFree (LOOP_CTL_GET_FREE)", func(s sweepPoint) float64 { return s.getFree }},
	}); err != nil {
		return err
	}
	return drawPlot("Listing the bound loop devices", listPlot, []line{
		{"util-linux losetup --json --list (process)", func(s sweepPoint) float64 { return s.losetup }},
		{"C, List's calls on one thread", func(s sweepPoint) float64 { return s.listC }},
		{"loopctl List", func(s sweepPoint) float64 { return s.list }},
	})
}

var plotColors = []color.Color{
	color.RGBA{R: 0xd6, G: 0x27, B: 0x28, A: 0xff},
	color.RGBA{R: 0xff, G: 0x7f, B: 0x0e, A: 0xff},
	color.RGBA{R: 0x1f, G: 0x77, B: 0xb4, A: 0xff},
}

var plotShapes = []draw.GlyphDrawer{draw.CircleGlyph{}, draw.TriangleGlyph{}, draw.SquareGlyph{}}
