// Package dist holds no code: its tests check the files strait ships for
// installation on hosts, the systemd unit (dist/systemd). See
// docs/systemd.md.
package dist
