package nodekeys

import (
	"k8s.io/client-go/dynamic"

	"github.com/secureoverlay/secureoverlay/internal/objcache"
)

// Cache is an informer over the NodeKeys of one namespace, keeping each object parsed (a
// few hundred bytes per node). An object that does not parse is kept as its error: a
// reader treats that node as publishing no keys.
type Cache = objcache.Cache[Keys]

// NewCache builds the informer (nothing runs until Start). onChange, if set, is called
// after every change with the node's name; it must be cheap and must not block.
func NewCache(dc dynamic.Interface, ns string, onChange func(node string)) *Cache {
	return objcache.New(dc, GVR, ns, Parse, onChange)
}
