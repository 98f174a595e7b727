package watch

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"

	"github.com/secureoverlay/secureoverlay/reconciler/desired"
)

// The lean IPAMBlock path (issue 16: the agent at 5,000 Nodes + 20,000 IPAMBlocks).
// Through the dynamic client, listing 20,000 IPAMBlocks decoded 26.7 MB of JSON into
// unstructured maps (64 allocations, attributes with handles and pod names per block)
// before the transform reduced each to its parsed form: ≈2 s and a heap peak for data the
// agent drops at once. client-go has no hook for the decoding, so this is the smallest
// shim: the list is read from the response stream one item at a time straight into the
// few fields ParseIPAMBlock reads (the same parse, BlockFromV3), and the watch decodes
// each event the same way. Only what the informer machinery needs of the list (its
// resourceVersion and continue token) is kept.

// leanList is a list of parsed objects for the informer's reflector (meta.ExtractList
// reads Items, meta.ListAccessor the ListMeta).
type leanList struct {
	metav1.ListMeta
	Items []parsedObject
}

func (l *leanList) GetObjectKind() schema.ObjectKind { return schema.EmptyObjectKind }

// DeepCopyObject copies the list; the items' parsed values are shared (never modified).
func (l *leanList) DeepCopyObject() runtime.Object {
	c := &leanList{Items: append([]parsedObject(nil), l.Items...)}
	l.ListMeta.DeepCopyInto(&c.ListMeta)
	return c
}

// leanBlock is what the JSON of an IPAMBlock (crd.projectcalico.org/v1 or
// projectcalico.org/v3: the same field names) is decoded into: the fields ParseIPAMBlock
// reads, nothing else — of an attribute's owner attributes only "node" (no map per
// address; a malformed key the agent never reads is not an error here, as it is on the
// unstructured path).
type leanBlock struct {
	Metadata struct {
		Name            string `json:"name"`
		Namespace       string `json:"namespace"`
		ResourceVersion string `json:"resourceVersion"`
	} `json:"metadata"`
	Spec struct {
		CIDR        string   `json:"cidr"`
		Affinity    *string  `json:"affinity"`
		Deleted     flexBool `json:"deleted"`
		Allocations []*int   `json:"allocations"`
		Attributes  []struct {
			Secondary struct {
				Node string `json:"node"`
			} `json:"secondary"`
		} `json:"attributes"`
	} `json:"spec"`
}

// flexBool is a boolean that also reads Calico v1's "true"/"false" strings (toV3 does the
// same on the unstructured path). A value that is neither is kept in bad and reported by
// parsed as the block's error: an UnmarshalJSON error would stop the decoder on the spot,
// and the block would lose its name (needed to cache it with its error).
type flexBool struct {
	val bool
	bad []byte
}

func (b *flexBool) UnmarshalJSON(data []byte) error {
	var v any
	if err := json.Unmarshal(data, &v); err != nil {
		return err
	}
	switch t := v.(type) {
	case bool:
		b.val = t
	case string:
		b.val = truthy(t)
	case nil:
		b.val = false
	default:
		b.bad = append([]byte(nil), data...)
	}
	return nil
}

// parsed is the cache's form of the block: ParseIPAMBlock's result (or error) by name.
func (b *leanBlock) parsed() parsedObject {
	p := parsedObject{objectName: objectName{Namespace: b.Metadata.Namespace, Name: b.Metadata.Name, ResourceVersion: b.Metadata.ResourceVersion}}
	if b.Spec.Deleted.bad != nil {
		p.Value, p.Err = desired.Block{}, fmt.Errorf("ipamblock %q: deleted: %s is neither a boolean nor a string", b.Metadata.Name, b.Spec.Deleted.bad)
		return p
	}
	attrNodes := make([]string, len(b.Spec.Attributes))
	for i, a := range b.Spec.Attributes {
		attrNodes[i] = a.Secondary.Node
	}
	p.Value, p.Err = blockFrom(b.Metadata.Name, b.Spec.CIDR, b.Spec.Affinity, b.Spec.Deleted.val, b.Spec.Allocations, attrNodes)
	return p
}

// decodeLeanBlock decodes one IPAMBlock's JSON (a watch event's object).
func decodeLeanBlock(data []byte) (parsedObject, error) {
	return decodeLeanItem(json.NewDecoder(bytes.NewReader(data)))
}

// decodeLeanItem decodes the next IPAMBlock of dec's stream straight into a leanBlock (one
// scan to find its end, one to decode: no copy of its bytes, no third validating pass as
// json.Unmarshal of a copy made; that was 40% of an agent's CPU to its first sync at
// 20,000 blocks, TestBenchAgentMemory's profile). A block whose spec does not decode is
// cached with its error, as on the unstructured path (reported as skipped; it never fails
// the whole list): the decoder completes the object past a value of the wrong type and
// reports the first one. JSON that is not an object, and a block of the wrong shape without
// a name, are errors.
func decodeLeanItem(dec *json.Decoder) (parsedObject, error) {
	var b leanBlock
	if err := dec.Decode(&b); err != nil {
		var te *json.UnmarshalTypeError
		if !errors.As(err, &te) || b.Metadata.Name == "" {
			return parsedObject{}, fmt.Errorf("ipamblock: %w", err)
		}
		return parsedObject{objectName: objectName{Namespace: b.Metadata.Namespace, Name: b.Metadata.Name,
			ResourceVersion: b.Metadata.ResourceVersion}, Value: desired.Block{}, Err: fmt.Errorf("ipamblock %q: %w", b.Metadata.Name, err)}, nil
	}
	return b.parsed(), nil // a bookmark too: its object has only a resourceVersion
}

// leanBlocksLW lists and watches the IPAMBlocks of gvr through c, decoding as above. It
// opts out of client-go's watch-list (initial events streamed over a watch, ended by an
// annotated bookmark the lean decoder would not keep): a plain paginated list.
type leanBlocksLW struct {
	c   rest.Interface
	gvr schema.GroupVersionResource
}

// newLeanRESTClient is a REST client for cfg that reads JSON (the lean path reads the
// response bodies itself; the codecs decode only error Status objects).
func newLeanRESTClient(cfg *rest.Config) (rest.Interface, error) {
	c := rest.CopyConfig(cfg)
	c.ContentType, c.AcceptContentTypes = runtime.ContentTypeJSON, runtime.ContentTypeJSON
	c.NegotiatedSerializer = scheme.Codecs.WithoutConversion()
	c.GroupVersion = nil
	c.APIPath = ""
	rc, err := rest.UnversionedRESTClientFor(c)
	if err != nil {
		return nil, err // not a typed nil in the interface
	}
	return rc, nil
}

func (lw *leanBlocksLW) IsWatchListSemanticsUnSupported() bool { return true }

func (lw *leanBlocksLW) request(opts *metav1.ListOptions) *rest.Request {
	return lw.c.Get().AbsPath("/apis", lw.gvr.Group, lw.gvr.Version, lw.gvr.Resource).
		VersionedParams(opts, metav1.ParameterCodec)
}

func (lw *leanBlocksLW) ListWithContext(ctx context.Context, opts metav1.ListOptions) (runtime.Object, error) {
	body, err := lw.request(&opts).Stream(ctx)
	if err != nil {
		return nil, err
	}
	defer body.Close()
	return decodeLeanList(body)
}

// List is ListWithContext without a context (cache.Lister).
func (lw *leanBlocksLW) List(opts metav1.ListOptions) (runtime.Object, error) {
	return lw.ListWithContext(context.Background(), opts)
}

func (lw *leanBlocksLW) WatchWithContext(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error) {
	opts.Watch = true
	body, err := lw.request(&opts).Stream(ctx)
	if err != nil {
		return nil, err
	}
	return watch.NewStreamWatcher(&leanWatchDecoder{body: body, dec: json.NewDecoder(body)},
		apierrors.NewClientErrorReporter(http.StatusInternalServerError, "GET", "ClientWatchDecoding")), nil
}

// Watch is WatchWithContext without a context (cache.Watcher).
func (lw *leanBlocksLW) Watch(opts metav1.ListOptions) (watch.Interface, error) {
	return lw.WatchWithContext(context.Background(), opts)
}

var _ cache.ListerWatcherWithContext = (*leanBlocksLW)(nil)

// decodeLeanList reads an IPAMBlockList from r an item at a time.
func decodeLeanList(r io.Reader) (*leanList, error) {
	dec := json.NewDecoder(r)
	list := &leanList{}
	if err := expectDelim(dec, '{'); err != nil {
		return nil, err
	}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, fmt.Errorf("ipamblock list: %w", err)
		}
		switch key, _ := tok.(string); key {
		case "metadata":
			if err := dec.Decode(&list.ListMeta); err != nil {
				return nil, fmt.Errorf("ipamblock list metadata: %w", err)
			}
		case "items":
			tok, err := dec.Token()
			if err != nil {
				return nil, fmt.Errorf("ipamblock list items: %w", err)
			}
			if tok == nil { // "items": null
				continue
			}
			if d, ok := tok.(json.Delim); !ok || d != '[' {
				return nil, fmt.Errorf("ipamblock list items: %v is not an array", tok)
			}
			for dec.More() {
				p, err := decodeLeanItem(dec)
				if err != nil {
					return nil, fmt.Errorf("ipamblock list item %d: %w", len(list.Items), err)
				}
				list.Items = append(list.Items, p)
			}
			if _, err := dec.Token(); err != nil { // ']'
				return nil, fmt.Errorf("ipamblock list items: %w", err)
			}
		default: // apiVersion, kind
			var skip json.RawMessage
			if err := dec.Decode(&skip); err != nil {
				return nil, fmt.Errorf("ipamblock list %q: %w", key, err)
			}
		}
	}
	if err := expectDelim(dec, '}'); err != nil {
		return nil, err
	}
	return list, nil
}

func expectDelim(dec *json.Decoder, want json.Delim) error {
	tok, err := dec.Token()
	if err != nil {
		return fmt.Errorf("ipamblock list: %w", err)
	}
	if d, ok := tok.(json.Delim); !ok || d != want {
		return fmt.Errorf("ipamblock list: got %v, want %q", tok, want)
	}
	return nil
}

// leanWatchDecoder decodes a watch stream of IPAMBlocks ({"type":…,"object":…} per event).
type leanWatchDecoder struct {
	body io.ReadCloser
	dec  *json.Decoder
}

func (d *leanWatchDecoder) Decode() (watch.EventType, runtime.Object, error) {
	var ev struct {
		Type   watch.EventType `json:"type"`
		Object json.RawMessage `json:"object"`
	}
	if err := d.dec.Decode(&ev); err != nil {
		return "", nil, err
	}
	switch ev.Type {
	case watch.Added, watch.Modified, watch.Deleted, watch.Bookmark:
		p, err := decodeLeanBlock(ev.Object)
		if err != nil {
			return "", nil, err
		}
		return ev.Type, &p, nil
	case watch.Error:
		var st metav1.Status
		if err := json.Unmarshal(ev.Object, &st); err != nil {
			return "", nil, fmt.Errorf("ipamblock watch error event: %w", err)
		}
		return ev.Type, &st, nil
	default:
		return "", nil, fmt.Errorf("ipamblock watch: invalid event type %q", ev.Type)
	}
}

func (d *leanWatchDecoder) Close() { d.body.Close() }
