// Package calicochain holds the test that runs the real calico CNI plugin (Calico
// v3.32.1, Kubernetes-datastore mode, against a real kube-apiserver) chained before
// secureoverlay, through libcni, the way a container runtime runs Calico's conflist on a
// node of a default Calico install. It has no non-test code.
package calicochain
