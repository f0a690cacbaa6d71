package main

import (
	"fmt"
	"image/color"
	"math"
	"path/filepath"
	"strconv"
	"strings"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
)

// The plots: time per operation against bound devices, on log scales.
const scanPlot = "getfree-vs-scan.svg"

// scalePlot is the file of the scale table of op key.
func scalePlot(key string) string { return "scale-" + key + ".svg" }

// A plotLine is one implementation's times, in ns, at the plot's counts.
type plotLine struct {
	name string
	ns   []float64
}

// logPlot draws lines against counts of bound devices, both axes on log
// scales, into file.
func logPlot(title, file string, counts []int, lines []plotLine) error {
	p := plot.New()
	p.Title.Text = title
	p.X.Label.Text = "bound loop devices"
	p.Y.Label.Text = "time per operation (µs)"
	p.X.Scale, p.Y.Scale = plot.LogScale{}, plot.LogScale{}
	p.Y.Tick.Marker = plot.LogTicks{Prec: -1}
	// The counts measured, as ticks, and room on either side of them.
	var ticks []plot.Tick
	lo, hi := math.Inf(1), 0.0
	for j, n := range counts {
		ticks = append(ticks, plot.Tick{Value: float64(n), Label: strconv.Itoa(n)})
		for _, l := range lines {
			lo, hi = min(lo, l.ns[j]/1e3), max(hi, l.ns[j]/1e3)
		}
	}
	p.X.Tick.Marker = plot.ConstantTicks(ticks)
	if len(counts) > 0 {
		p.X.Min, p.X.Max = float64(counts[0])/1.5, float64(counts[len(counts)-1])*1.5
	}
	// The legend goes top left, above the lines, where a renderer whose
	// font is wider than gonum measured has room to its right.
	p.Y.Min, p.Y.Max = lo/3, hi*8
	p.Legend.Top, p.Legend.Left = true, true
	p.Legend.XOffs, p.Legend.YOffs = vg.Points(6), -vg.Points(14)
	for i, l := range lines {
		xys := make(plotter.XYs, len(counts))
		for j, n := range counts {
			xys[j].X, xys[j].Y = float64(n), l.ns[j]/1e3
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

func (h *harness) plots() error {
	var counts []int
	var scanC, scanGo, getFree []float64
	for _, s := range h.sweep {
		counts = append(counts, s.bound)
		scanC, scanGo, getFree = append(scanC, s.scanC), append(scanGo, s.scanGo), append(getFree, s.getFree)
	}
	if err := logPlot("Finding a free loop device", scanPlot, counts, []plotLine{
		{"scan: open /dev/loopN + LOOP_GET_STATUS64 until ENXIO (C)", scanC},
		{"scan (Go, bare syscalls)", scanGo},
		{"loopctl Control.GetFree (LOOP_CTL_GET_FREE)", getFree},
	}); err != nil {
		return err
	}
	// The scale tables, at their bound counts (the column without bound
	// devices has no place on these axes).
	var bound []int
	for _, p := range h.points {
		if p.bound > 0 {
			bound = append(bound, p.bound)
		}
	}
	for _, t := range h.scaleTables {
		var lines []plotLine
		for _, kind := range []int{rowLosetup, rowC, rowCThreads, rowLoopctl, rowLoopctlCold} {
			r := t.row(kind)
			if r == nil {
				continue
			}
			l := plotLine{name: strings.ReplaceAll(r.impl, "`", "")}
			for i, p := range h.points {
				if p.bound > 0 {
					l.ns = append(l.ns, medianOf(r.times[i]))
				}
			}
			lines = append(lines, l)
		}
		if err := logPlot(t.op.title, scalePlot(t.op.key), bound, lines); err != nil {
			return err
		}
	}
	return nil
}

var plotColors = []color.Color{
	color.RGBA{R: 0xd6, G: 0x27, B: 0x28, A: 0xff},
	color.RGBA{R: 0xff, G: 0x7f, B: 0x0e, A: 0xff},
	color.RGBA{R: 0x1f, G: 0x77, B: 0xb4, A: 0xff},
	color.RGBA{R: 0x2c, G: 0xa0, B: 0x2c, A: 0xff},
	color.RGBA{R: 0x94, G: 0x67, B: 0xbd, A: 0xff},
}

var plotShapes = []draw.GlyphDrawer{draw.CircleGlyph{}, draw.TriangleGlyph{}, draw.SquareGlyph{}, draw.CrossGlyph{}, draw.PlusGlyph{}}

// The data-path plots: throughput by mode, and the page cache each leaves.
const (
	dataPlot      = "datapath-throughput.svg"
	dataCachePlot = "datapath-cache.svg"
)

// dataPlots draws the data-path table: bars by file system and mode.
func (h *harness) dataPlots() error {
	var rows []*dataRow
	for _, r := range h.data {
		if r.skipped == "" {
			rows = append(rows, r)
		}
	}
	if len(rows) == 0 {
		return nil
	}
	labels := make([]string, len(rows))
	for i, r := range rows {
		labels[i] = r.fs + "\n" + strings.NewReplacer("backing file, read directly", "file itself", "loop device, ", "", ", 4096-byte blocks", ",\n4096 blocks").Replace(r.mode)
	}
	type series struct {
		name string
		v    func(*dataRow) float64
	}
	bars := func(title, ylabel, file string, ss []series) error {
		p := plot.New()
		p.Title.Text = title
		p.Y.Label.Text = ylabel
		w := vg.Points(14)
		for i, s := range ss {
			vals := make(plotter.Values, len(rows))
			for j, r := range rows {
				vals[j] = s.v(r)
			}
			b, err := plotter.NewBarChart(vals, w)
			if err != nil {
				return err
			}
			b.Color = plotColors[i%len(plotColors)]
			b.LineStyle.Width = 0
			b.Offset = w * vg.Length(float64(i)-float64(len(ss)-1)/2)
			p.Add(b)
			p.Legend.Add(s.name, b)
		}
		// The legend goes top left, above bars given room by a higher
		// axis; the labels get room at either end.
		top := 0.0
		for _, s := range ss {
			for _, r := range rows {
				top = max(top, s.v(r))
			}
		}
		p.Y.Min, p.Y.Max = 0, top*1.3
		p.Legend.Top, p.Legend.Left = true, true
		p.Legend.XOffs, p.Legend.YOffs = vg.Points(6), -vg.Points(4)
		p.NominalX(labels...)
		p.X.Min, p.X.Max = -0.7, float64(len(rows))-0.3
		p.Add(plotter.NewGrid())
		return p.Save(10*vg.Inch, 4.5*vg.Inch, filepath.Join(*svgDir, file))
	}
	if err := bars(fmt.Sprintf("Moving %d MiB through a loop device", *dataSize>>20), "MB/s", dataPlot, []series{
		{"sequential read", func(r *dataRow) float64 { return medianOf(r.seqRead) }},
		{"sequential write, synced", func(r *dataRow) float64 { return medianOf(r.seqWrite) }},
	}); err != nil {
		return err
	}
	return bars(fmt.Sprintf("Page cache added by reading %d MiB from a dropped cache", *dataSize>>20), "MiB", dataCachePlot, []series{
		{"Cached (files: the backing file)", func(r *dataRow) float64 { return medianOf(r.cached) }},
		{"Buffers (block devices: the loop device)", func(r *dataRow) float64 { return medianOf(r.buffers) }},
	})
}
