# strait: `make test` is what CI runs (.ci/run). `make help` lists targets.
.DEFAULT_GOAL := help
GO      ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -s -w -X main.version=$(VERSION)
# Built by `go run pkg@version` from its own go.mod: the linter's
# dependencies never enter this module's go.mod, nor the binary's.
STATICCHECK := $(GO) run honnef.co/go/tools/cmd/staticcheck@v0.8.2

.PHONY: help build consul test test-unit test-integration lint fuzz demo bench clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

build: ## build the static strait binary into bin/strait
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/strait ./cmd/strait

consul: ## build the pinned real Consul into bin/consul (~5 min cold)
	scripts/build-consul.sh

test: test-unit test-integration ## everything CI runs: vet, staticcheck, unit tests (race), fuzz seed corpora, dependency check, integration tests against real Consul

lint: ## go vet, and staticcheck on both modules (integration/ is its own module)
	$(GO) vet ./...
	# internal/yamux is a fork kept as close to upstream as possible (see its FORK.md)
	$(STATICCHECK) $$($(GO) list ./... | grep -v '/internal/yamux$$')
	cd integration && $(STATICCHECK) ./...

test-unit: lint ## vet + staticcheck + unit tests with the race detector (fuzz seeds included); promtool required
	STRAIT_REQUIRE_TOOLS=1 $(GO) test -race -count=1 ./...
	# allocation checks cannot run under -race (AllocsPerRun is skewed), so once more without it
	$(GO) test -count=1 -run 'Alloc' ./...

test-integration: consul ## end-to-end tests (race-built strait): real consul agent -dev, real consul connect proxy peers, Connect-native SDK peers
	cd integration && $(GO) vet ./... && STRAIT_REQUIRE_TOOLS=1 STRAIT_RACE=1 $(GO) test -race -count=1 -parallel 4 -timeout 20m ./...

fuzz: ## run each fuzz target for FUZZTIME (default 30s)
	$(GO) test ./tlsutil -run '^$$' -fuzz FuzzParseID -fuzztime $${FUZZTIME:-30s}
	$(GO) test ./config -run '^$$' -fuzz FuzzParseUpstream -fuzztime $${FUZZTIME:-30s}
	$(GO) test ./authz -run '^$$' -fuzz FuzzMatch -fuzztime $${FUZZTIME:-30s}
	$(GO) test ./gateway -run '^$$' -fuzz FuzzParseClientHello -fuzztime $${FUZZTIME:-30s}

demo: build consul ## run two strait proxies against a dev agent and flip an intention
	scripts/demo.sh

bench: build consul ## strait vs consul connect proxy vs a plain relay (and HAProxy, stunnel if installed), 3 interleaved rounds (~9 min); writes BENCHMARKS.md; BENCHFLAGS="-rounds 1 -duration 2s -only strait" for quick runs
	$(GO) run ./scripts/bench $(BENCHFLAGS)

clean: ## remove built binaries
	rm -rf bin/strait bin/consul
