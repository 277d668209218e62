package ktls

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"math/big"
	"net"
	"sync"
	"testing"
	"time"
)

func selfSigned(t *testing.T) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), DNSNames: []string{"x"}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// tapConn records what the client writes, with a mark where the handshake
// ended.
type tapConn struct {
	net.Conn
	mu  sync.Mutex
	out bytes.Buffer
}

func (c *tapConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	c.out.Write(p)
	c.mu.Unlock()
	return c.Conn.Write(p)
}

func (c *tapConn) written() []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]byte(nil), c.out.Bytes()...)
}

// TestTrafficKeysOpenRealRecords: keys derived from the key-logged secrets
// open the application records crypto/tls actually wrote, at the sequence
// numbers we claim, in both suites the kernel can offload. This is what
// the kernel would be given.
func TestTrafficKeysOpenRealRecords(t *testing.T) {
	t.Parallel()
	{
		t.Run("negotiated", func(t *testing.T) {
			t.Parallel()
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			srvCfg := &tls.Config{Certificates: []tls.Certificate{selfSigned(t)}, MinVersion: tls.VersionTLS13}
			go func() {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				defer c.Close()
				s := tls.Server(c, srvCfg)
				buf := make([]byte, 64)
				for {
					if _, err := s.Read(buf); err != nil {
						return
					}
				}
			}()
			raw, err := net.Dial("tcp", ln.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			tap := &tapConn{Conn: raw}
			var log secretLog
			// crypto/tls does not let a TLS 1.3 endpoint choose its suites;
			// the derivation is checked for whichever suite it negotiated.
			cli := tls.Client(tap, &tls.Config{InsecureSkipVerify: true, KeyLogWriter: &log, MinVersion: tls.VersionTLS13})
			defer cli.Close()
			if err := cli.Handshake(); err != nil {
				t.Fatal(err)
			}
			mark := len(tap.written())
			msgs := [][]byte{[]byte("hello kernel"), bytes.Repeat([]byte{7}, 3000)}
			for _, m := range msgs {
				if _, err := cli.Write(m); err != nil {
					t.Fatal(err)
				}
			}
			got := cli.ConnectionState().CipherSuite
			if len(log.Client) == 0 || len(log.Server) == 0 {
				t.Fatal("traffic secrets not captured from the key log")
			}
			ci, err := trafficKeys(got, log.Client, 0)
			if err != nil {
				t.Fatal(err)
			}
			// crypto/tls sizes records dynamically (small ones first), so
			// open every record in order and compare the stream.
			recs := tap.written()[mark:]
			var stream []byte
			for seq := uint64(0); len(recs) > 0; seq++ {
				if len(recs) < 5 {
					t.Fatalf("truncated record header after %d records", seq)
				}
				n := int(binary.BigEndian.Uint16(recs[3:5]))
				hdr, body := recs[:5], recs[5:5+n]
				recs = recs[5+n:]
				plain := open(t, ci, seq, hdr, body)
				if inner := plain[len(plain)-1]; inner != 23 {
					t.Fatalf("record %d inner type %d, want application_data", seq, inner)
				}
				stream = append(stream, plain[:len(plain)-1]...)
			}
			if want := bytes.Join(msgs, nil); !bytes.Equal(stream, want) {
				t.Fatalf("opened %d bytes, want the %d written", len(stream), len(want))
			}
			// And a wrong sequence number must not open it.
			ci2, _ := trafficKeys(got, log.Client, 5)
			first := tap.written()[mark:]
			n := int(binary.BigEndian.Uint16(first[3:5]))
			if _, err := gcmOpen(ci2, ci2.RecSeq, first[:5], first[5:5+n]); err == nil {
				t.Fatal("record opened with the wrong sequence number")
			}
		})
	}
}

func open(t *testing.T, ci cryptoInfo, seq uint64, hdr, body []byte) []byte {
	t.Helper()
	p, err := gcmOpen(ci, seq, hdr, body)
	if err != nil {
		t.Fatalf("opening record %d: %v", seq, err)
	}
	return p
}

// gcmOpen decrypts a TLS 1.3 record the way the kernel will: nonce =
// salt||iv XOR the sequence number, additional data = the record header.
func gcmOpen(ci cryptoInfo, seq uint64, hdr, body []byte) ([]byte, error) {
	blk, err := aes.NewCipher(ci.Key)
	if err != nil {
		return nil, err
	}
	aead, err := cipher.NewGCM(blk)
	if err != nil {
		return nil, err
	}
	nonce := append(append([]byte{}, ci.Salt[:]...), ci.IV[:]...)
	var s [8]byte
	binary.BigEndian.PutUint64(s[:], seq)
	for i := range s {
		nonce[4+i] ^= s[i]
	}
	return aead.Open(nil, nonce, body, hdr)
}

func TestMarshalLayout(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		suite  uint16
		size   int
		cipher uint16
	}{
		{tls.TLS_AES_128_GCM_SHA256, 4 + 8 + 16 + 4 + 8, cipherAESGCM128},
		{tls.TLS_AES_256_GCM_SHA384, 4 + 8 + 32 + 4 + 8, cipherAESGCM256},
	} {
		ci, err := trafficKeys(tc.suite, bytes.Repeat([]byte{1}, 48), 0x0102030405060708)
		if err != nil {
			t.Fatal(err)
		}
		b := ci.Marshal()
		if len(b) != tc.size {
			t.Fatalf("%s: %d bytes, want %d (struct tls12_crypto_info_aes_gcm_*)", tls.CipherSuiteName(tc.suite), len(b), tc.size)
		}
		if v := binary.NativeEndian.Uint16(b[0:2]); v != tls13Version {
			t.Fatalf("version %#x", v)
		}
		if c := binary.NativeEndian.Uint16(b[2:4]); c != tc.cipher {
			t.Fatalf("cipher %d, want %d", c, tc.cipher)
		}
		off := 4
		if !bytes.Equal(b[off:off+8], ci.IV[:]) {
			t.Fatal("iv misplaced")
		}
		off += 8
		if !bytes.Equal(b[off:off+len(ci.Key)], ci.Key) {
			t.Fatal("key misplaced")
		}
		off += len(ci.Key)
		if !bytes.Equal(b[off:off+4], ci.Salt[:]) {
			t.Fatal("salt misplaced")
		}
		off += 4
		if !bytes.Equal(b[off:], []byte{1, 2, 3, 4, 5, 6, 7, 8}) {
			t.Fatalf("rec_seq %x, want big-endian 0102030405060708", b[off:])
		}
	}
	if _, err := trafficKeys(tls.TLS_CHACHA20_POLY1305_SHA256, make([]byte, 32), 0); !errors.Is(err, ErrUnsupported) {
		t.Fatalf("ChaCha20 accepted for offload: %v", err)
	}
}

// TestProbeAndInstallFallBackCleanly: on a kernel without kTLS (this CI
// machine: CONFIG_TLS unset) the probe and the install on a live socket
// fail with ErrUnsupported and leave the connection usable; on a kernel with
// it, the probe succeeds.
func TestProbeAndInstallFallBackCleanly(t *testing.T) {
	t.Parallel()
	probeErr := Probe()
	if probeErr != nil && !errors.Is(probeErr, ErrUnsupported) {
		t.Fatalf("probe failed for another reason than missing support: %v", probeErr)
	}
	t.Logf("kTLS probe on this kernel: %v", probeErr)

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	peer := <-accepted
	defer peer.Close()
	if probeErr == nil {
		return // a kTLS kernel: installing keys on a non-TLS stream is out of scope here
	}
	rc, _ := c.(*net.TCPConn).SyscallConn()
	ci, _ := trafficKeys(tls.TLS_AES_128_GCM_SHA256, make([]byte, 32), 0)
	if err := install(rc, &ci, &ci); !errors.Is(err, ErrUnsupported) {
		t.Fatalf("Install on a kernel without kTLS: %v, want ErrUnsupported", err)
	}
	// The socket is untouched: plain bytes still flow.
	if _, err := c.Write([]byte("still plain")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 11)
	peer.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := peer.Read(buf); err != nil || string(buf) != "still plain" {
		t.Fatalf("socket unusable after the failed install: %q %v", buf, err)
	}
}
