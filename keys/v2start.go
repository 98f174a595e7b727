package keys

// The start derivation: at start (and after an epoch change) an agent derives, for every
// peer, one pair secret (one X25519 and one HKDF-Extract) and a few SAs per generation.
// The peers are independent, so DerivePeersV2 spreads them over a bounded number of
// workers. It stays pure: no clock, no I/O, the same output for the same input whatever
// the number of workers.

import (
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
)

// PeerSAsV2 are the SAs of one peer in one generation, for each kind asked for (same
// index as the kinds argument): Out is the SA self→peer, In the SA peer→self.
type PeerSAsV2 struct {
	Out, In []SA
}

// DerivePeersV2 derives, for each peer (by index: result[i] is peers[i]'s), the outbound
// and inbound SAs of each kind in kinds and lane in generation g, self being this node's
// private key for g and me its endpoint. It uses at most workers goroutines (≤ 0:
// GOMAXPROCS) and never more than one per peer; each pair secret is erased once its SAs
// are derived.
//
// The result does not depend on workers. On failure it returns the error of the lowest
// failing peer index — the one a serial loop would meet first — naming the peer by index
// and IP (errors carry no key bytes), and no SAs.
func DerivePeersV2(g GenerationV2, self *PrivateKey, me EndpointV2, peers []EndpointV2, kinds []Kind, lane uint16, workers int) ([]PeerSAsV2, error) {
	if workers <= 0 {
		workers = runtime.GOMAXPROCS(0)
	}
	workers = min(workers, len(peers))
	out := make([]PeerSAsV2, len(peers))
	if workers <= 1 {
		for i := range peers {
			if err := derivePeerV2(g, self, me, peers[i], kinds, lane, &out[i]); err != nil {
				eraseAll(out)
				return nil, fmt.Errorf("derive peer %d (%s): %w", i, peers[i].IP, err)
			}
		}
		return out, nil
	}
	var (
		next   atomic.Int64 // the next peer index to hand out
		failed atomic.Int64 // the lowest failing index so far (len(peers) while none)
		errs   = make([]error, len(peers))
		wg     sync.WaitGroup
	)
	failed.Store(int64(len(peers)))
	for range workers {
		wg.Go(func() {
			for {
				i := next.Add(1) - 1
				// Indices are handed out in increasing order, so once peer f failed every
				// index below f has been or is being derived: the lowest failure is found.
				if i >= failed.Load() {
					return
				}
				if err := derivePeerV2(g, self, me, peers[i], kinds, lane, &out[i]); err != nil {
					errs[i] = err
					for f := failed.Load(); i < f && !failed.CompareAndSwap(f, i); f = failed.Load() {
					}
					return
				}
			}
		})
	}
	wg.Wait()
	if f := failed.Load(); f < int64(len(peers)) {
		eraseAll(out)
		return nil, fmt.Errorf("derive peer %d (%s): %w", f, peers[f].IP, errs[f])
	}
	return out, nil
}

// derivePeerV2 derives one peer's SAs into o.
func derivePeerV2(g GenerationV2, self *PrivateKey, me, peer EndpointV2, kinds []Kind, lane uint16, o *PeerSAsV2) error {
	d, err := NewPairDeriver(g, self, peer.Public)
	if err != nil {
		return err
	}
	defer d.Erase()
	o.Out, o.In = make([]SA, len(kinds)), make([]SA, len(kinds))
	for k, kind := range kinds {
		if o.Out[k], err = d.Derive(kind, lane, me, peer); err != nil {
			return err
		}
		if o.In[k], err = d.Derive(kind, lane, peer, me); err != nil {
			return err
		}
	}
	return nil
}

// eraseAll zeroes the keys of a result that is not returned.
func eraseAll(out []PeerSAsV2) {
	for _, o := range out {
		for _, s := range [][]SA{o.Out, o.In} {
			for i := range s {
				clear(s[i].Key)
			}
		}
	}
}
