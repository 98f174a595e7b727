// Package testutil holds small helpers the tests of several packages share.
package testutil

import (
	"strings"
	"sync"
)

// SyncBuffer is an io.Writer whose contents can be read while other goroutines (a
// logger, an exec.Cmd's output copier) write to it.
type SyncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

// Write appends p.
func (s *SyncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

// String returns everything written so far.
func (s *SyncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
