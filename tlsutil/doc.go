// Package tlsutil holds strait's identity material: the leaf certificate and
// CA roots fetched from the local Consul agent (Source), the TLS
// configurations built from them for the public listener and for upstream
// dials, and Consul's SPIFFE ID forms (Identity).
//
// Peer verification runs in tls.Config.VerifyConnection, which Go calls on
// every handshake including resumed sessions; VerifyPeerCertificate is not
// used because resumption skips it.
package tlsutil
