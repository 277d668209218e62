// Package deploy holds no code: its tests check the deployment artifacts
// that ship with strait, the container image (Dockerfile, .dockerignore at
// the repository root) and the Kubernetes manifests (deploy/kubernetes).
// See docs/kubernetes.md.
package deploy
