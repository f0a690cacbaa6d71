package loopctl

import (
	"encoding/binary"
	"hash/crc32"
)

// The sector sizes an image's GPT header is probed at, as systemd probes
// them, and how much of the image that reads.
var gptSectorSizeList = [...]uint32{512, 1024, 2048, 4096}

const gptProbeSize = 4096 + 512

// gptSectorSizes returns the sector sizes at which b, the start of an
// image, holds a valid GPT header: the signature "EFI PART" at the start
// of the second sector (LBA 1), a header size from 92 bytes to the
// sector's, the header's own LBA 1, and its CRC32.
func gptSectorSizes(b []byte) []uint32 {
	var sizes []uint32
	for _, ssz := range gptSectorSizeList {
		if uint64(len(b)) < uint64(ssz)+92 {
			continue
		}
		h := b[ssz:]
		if string(h[:8]) != "EFI PART" {
			continue
		}
		hsize := binary.LittleEndian.Uint32(h[12:16])
		if hsize < 92 || hsize > ssz || uint64(hsize) > uint64(len(h)) {
			continue
		}
		if binary.LittleEndian.Uint64(h[24:32]) != 1 {
			continue
		}
		want := binary.LittleEndian.Uint32(h[16:20])
		crc := crc32.NewIEEE()
		crc.Write(h[:16])
		crc.Write([]byte{0, 0, 0, 0})
		crc.Write(h[20:hsize])
		if crc.Sum32() != want {
			continue
		}
		sizes = append(sizes, ssz)
	}
	return sizes
}
