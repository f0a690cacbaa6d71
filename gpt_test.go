package loopctl

import (
	"encoding/binary"
	"hash/crc32"
	"slices"
	"testing"
)

// gptImage returns the start of an image holding a GPT header at the
// second sector of each of sizes, as a partitioning tool writes it.
func gptImage(sizes ...uint32) []byte {
	b := make([]byte, gptProbeSize)
	for _, ssz := range sizes {
		h := b[ssz : ssz+92]
		copy(h, "EFI PART")
		binary.LittleEndian.PutUint32(h[8:], 0x00010000) // revision 1.0
		binary.LittleEndian.PutUint32(h[12:], 92)        // header size
		binary.LittleEndian.PutUint64(h[24:], 1)         // this header's LBA
		binary.LittleEndian.PutUint64(h[32:], 2047)      // the backup's
		binary.LittleEndian.PutUint32(h[16:], crc32.ChecksumIEEE(h))
	}
	return b
}

func TestGPTSectorSizes(t *testing.T) {
	for _, tt := range []struct {
		name string
		b    []byte
		want []uint32
	}{
		{"none", make([]byte, gptProbeSize), nil},
		{"512", gptImage(512), []uint32{512}},
		{"1024", gptImage(1024), []uint32{1024}},
		{"2048", gptImage(2048), []uint32{2048}},
		{"4096", gptImage(4096), []uint32{4096}},
		{"two", gptImage(512, 4096), []uint32{512, 4096}},
		{"short", gptImage(4096)[:4096+91], nil},
		{"bad CRC", func() []byte { b := gptImage(4096); b[4096+40]++; return b }(), nil},
		{"another LBA", func() []byte {
			b := gptImage(512)
			binary.LittleEndian.PutUint64(b[512+24:], 2)
			h := b[512 : 512+92]
			binary.LittleEndian.PutUint32(h[16:], 0)
			binary.LittleEndian.PutUint32(h[16:], crc32.ChecksumIEEE(h))
			return b
		}(), nil},
		{"header too large", func() []byte {
			b := gptImage(512)
			binary.LittleEndian.PutUint32(b[512+12:], 513)
			return b
		}(), nil},
	} {
		if got := gptSectorSizes(tt.b); !slices.Equal(got, tt.want) {
			t.Errorf("%s: gptSectorSizes = %v, want %v", tt.name, got, tt.want)
		}
	}
}

// FuzzGPTSectorSizes: any bytes give sizes from the list, in order,
// without a panic.
func FuzzGPTSectorSizes(f *testing.F) {
	f.Add(gptImage(512))
	f.Add(gptImage(4096))
	f.Add(gptImage(1024, 2048))
	f.Add([]byte("EFI PART"))
	f.Fuzz(func(t *testing.T, b []byte) {
		got := gptSectorSizes(b)
		if !slices.IsSorted(got) {
			t.Fatalf("sizes %v out of order", got)
		}
		for _, s := range got {
			if !slices.Contains(gptSectorSizeList[:], s) {
				t.Fatalf("size %d not probed", s)
			}
		}
	})
}
