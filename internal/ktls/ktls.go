// Package ktls holds what strait needs to hand an established TLS 1.3
// connection to the Linux kernel's TLS offload (kTLS), after which bytes can
// move with splice(2) instead of through user space: a runtime probe for
// kernel support, the TLS 1.3 key schedule step from a traffic secret to
// the record key and IV, the kernel's crypto_info layout, and the two
// setsockopt calls that install it.
//
// crypto/tls does not expose traffic secrets or record sequence numbers;
// the secrets come from Config.KeyLogWriter (see secretLog) and the caller
// must know the sequence numbers at the moment of hand-off.
//
// Only Probe is wired (strait reports at start whether offload is
// available); the hand-off pieces are unexported until a caller uses them.
package ktls

import (
	"crypto/hkdf"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/tls"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
)

// ErrUnsupported means this kernel, cipher suite or TLS version cannot be
// offloaded; callers keep using crypto/tls.
var ErrUnsupported = errors.New("ktls: not supported")

// Constants from linux/tls.h.
const (
	solTLS             = 282 // SOL_TLS
	tcpULP             = 31  // TCP_ULP
	tlsTX              = 1   // TLS_TX
	tlsRX              = 2   // TLS_RX
	tls13Version       = 0x0304
	cipherAESGCM128    = 51
	cipherAESGCM256    = 52
	gcmSaltSize        = 4
	gcmIVSize          = 8
	recSeqSize         = 8
	cryptoInfoHdrBytes = 4 // struct tls_crypto_info { __u16 version; __u16 cipher_type; }
)

// cryptoInfo is one direction's record protection as the kernel takes it
// (struct tls12_crypto_info_aes_gcm_{128,256}).
type cryptoInfo struct {
	Cipher uint16 // cipherAESGCM128 or cipherAESGCM256
	IV     [gcmIVSize]byte
	Key    []byte // 16 or 32 bytes
	Salt   [gcmSaltSize]byte
	RecSeq uint64 // the next record's sequence number
}

// Marshal lays ci out as the kernel's struct: version, cipher_type, iv,
// key, salt, rec_seq (big endian), with no padding.
func (ci cryptoInfo) Marshal() []byte {
	b := make([]byte, 0, cryptoInfoHdrBytes+gcmIVSize+len(ci.Key)+gcmSaltSize+recSeqSize)
	b = binary.NativeEndian.AppendUint16(b, tls13Version)
	b = binary.NativeEndian.AppendUint16(b, ci.Cipher)
	b = append(b, ci.IV[:]...)
	b = append(b, ci.Key...)
	b = append(b, ci.Salt[:]...)
	b = binary.BigEndian.AppendUint64(b, ci.RecSeq)
	return b
}

// trafficKeys derives one direction's cryptoInfo from a TLS 1.3 traffic
// secret (RFC 8446 7.3: key = HKDF-Expand-Label(secret, "key", "", len),
// iv = HKDF-Expand-Label(secret, "iv", "", 12)). The kernel wants the 12-byte
// IV split into a 4-byte salt and an 8-byte explicit part. Only the AES-GCM
// suites can be offloaded.
func trafficKeys(suite uint16, secret []byte, seq uint64) (cryptoInfo, error) {
	var (
		h      func() hash.Hash
		keyLen int
		cipher uint16
	)
	switch suite {
	case tls.TLS_AES_128_GCM_SHA256:
		h, keyLen, cipher = sha256.New, 16, cipherAESGCM128
	case tls.TLS_AES_256_GCM_SHA384:
		h, keyLen, cipher = sha512.New384, 32, cipherAESGCM256
	default:
		return cryptoInfo{}, fmt.Errorf("%w: cipher suite %s", ErrUnsupported, tls.CipherSuiteName(suite))
	}
	key, err := expandLabel(h, secret, "key", keyLen)
	if err != nil {
		return cryptoInfo{}, err
	}
	iv, err := expandLabel(h, secret, "iv", gcmSaltSize+gcmIVSize)
	if err != nil {
		return cryptoInfo{}, err
	}
	ci := cryptoInfo{Cipher: cipher, Key: key, RecSeq: seq}
	copy(ci.Salt[:], iv[:gcmSaltSize])
	copy(ci.IV[:], iv[gcmSaltSize:])
	return ci, nil
}

// expandLabel is HKDF-Expand-Label with an empty context.
func expandLabel(h func() hash.Hash, secret []byte, label string, n int) ([]byte, error) {
	full := "tls13 " + label
	info := make([]byte, 0, 4+len(full))
	info = binary.BigEndian.AppendUint16(info, uint16(n))
	info = append(info, byte(len(full)))
	info = append(info, full...)
	info = append(info, 0) // empty context
	return hkdf.Expand(h, secret, string(info), n)
}

// secretLog is a tls.Config.KeyLogWriter for one connection that keeps its
// TLS 1.3 application traffic secrets (and nothing else). Give every
// connection to be offloaded a Config of its own carrying a fresh secretLog.
type secretLog struct {
	Client, Server []byte // CLIENT_ and SERVER_TRAFFIC_SECRET_0
}

// Write parses one NSS key log line: "<label> <client random> <secret>".
func (s *secretLog) Write(line []byte) (int, error) {
	fields := splitFields(line)
	if len(fields) != 3 {
		return len(line), nil
	}
	label, secret := fields[0], fields[2] // fields[1] is the client random
	dst := &s.Client
	switch string(label) {
	case "CLIENT_TRAFFIC_SECRET_0":
	case "SERVER_TRAFFIC_SECRET_0":
		dst = &s.Server
	default:
		return len(line), nil
	}
	b := make([]byte, len(secret)/2)
	if _, err := hex.Decode(b, secret); err != nil {
		return 0, fmt.Errorf("ktls: key log secret: %w", err)
	}
	*dst = b
	return len(line), nil
}

func splitFields(line []byte) [][]byte {
	var out [][]byte
	start := -1
	for i, c := range line {
		sp := c == ' ' || c == '\n' || c == '\r'
		switch {
		case !sp && start < 0:
			start = i
		case sp && start >= 0:
			out = append(out, line[start:i])
			start = -1
		}
	}
	if start >= 0 {
		out = append(out, line[start:])
	}
	return out
}
