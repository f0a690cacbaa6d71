package main

import (
	"image/color"
	"math"
	"path/filepath"
	"strconv"

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
		p.Y.Tick.Marker = plot.LogTicks{Prec: -1}
		// The counts measured, as ticks, and room on either side of them.
		var ticks []plot.Tick
		lo, hi := math.Inf(1), 0.0
		for _, s := range h.sweep {
			ticks = append(ticks, plot.Tick{Value: float64(s.bound), Label: strconv.Itoa(s.bound)})
			for _, l := range lines {
				lo, hi = min(lo, l.y(s)/1e3), max(hi, l.y(s)/1e3)
			}
		}
		p.X.Tick.Marker = plot.ConstantTicks(ticks)
		if len(h.sweep) > 0 {
			p.X.Min, p.X.Max = float64(h.sweep[0].bound)/1.5, float64(h.sweep[len(h.sweep)-1].bound)*1.5
		}
		// The legend goes top left, above the lines, where a renderer
		// whose font is wider than gonum measured has room to its right.
		p.Y.Min, p.Y.Max = lo/3, hi*2
		p.Legend.Top, p.Legend.Left = true, true
		p.Legend.XOffs, p.Legend.YOffs = vg.Points(6), -vg.Points(4)
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
