module github.com/straitproxy/strait

go 1.26.0

require (
	github.com/armon/go-metrics v0.4.1
	github.com/coreos/go-systemd/v22 v22.7.0
	github.com/hashicorp/consul/api v1.33.0
	github.com/hashicorp/consul/sdk v0.17.0
	github.com/hashicorp/go-hclog v1.6.3
	github.com/libp2p/go-buffer-pool v0.0.2
	github.com/spiffe/go-spiffe/v2 v2.9.0
	golang.org/x/net v0.48.0
	golang.org/x/sync v0.24.0
	golang.org/x/sys v0.39.0
	golang.org/x/time v0.16.0
	sigs.k8s.io/yaml v1.6.0
)

require (
	github.com/fatih/color v1.16.0 // indirect
	github.com/go-viper/mapstructure/v2 v2.4.0 // indirect
	github.com/hashicorp/errwrap v1.1.0 // indirect
	github.com/hashicorp/go-cleanhttp v0.5.2 // indirect
	github.com/hashicorp/go-immutable-radix v1.3.1 // indirect
	github.com/hashicorp/go-multierror v1.1.1 // indirect
	github.com/hashicorp/go-rootcerts v1.0.2 // indirect
	github.com/hashicorp/golang-lru v0.5.4 // indirect
	github.com/hashicorp/serf v0.10.1 // indirect
	github.com/mattn/go-colorable v0.1.13 // indirect
	github.com/mattn/go-isatty v0.0.20 // indirect
	github.com/mitchellh/go-homedir v1.1.0 // indirect
	go.yaml.in/yaml/v2 v2.4.2 // indirect
	golang.org/x/exp v0.0.0-20250808145144-a408d31f581a // indirect
	golang.org/x/text v0.32.0 // indirect
)
