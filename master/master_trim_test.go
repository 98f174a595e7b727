package master

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/secureoverlay/secureoverlay/api"
)

// The master's cache keeps a report's cutover facts and none of its per-peer claims.
func TestTrimNodeKeepsWhatTheMasterReads(t *testing.T) {
	claims := map[string]string{}
	for i := range 1000 {
		claims[fmt.Sprintf("node-%04d", i)] = fmt.Sprintf("%08x", i)
	}
	raw, _ := json.Marshal(map[string]any{"mode": "encrypt", "generations": []uint32{4, 5}, "incarnation": "boot-b",
		"peersEncrypted": 999, "peersExpected": 1000, "maxSeqFraction": 0.25, "seqGeneration": 5,
		"inboundFrom": claims, "encryptingTo": claims})
	n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "b", Annotations: map[string]string{api.ReportAnnotation: string(raw), "other": "x"},
		ManagedFields: []metav1.ManagedFieldsEntry{{Manager: "kubelet"}}}}
	n.Status.NodeInfo.BootID = "boot-b"
	n.Status.Images = []corev1.ContainerImage{{Names: []string{"img"}}}
	before := NodeState(n)
	obj, err := trimNode(n)
	if err != nil {
		t.Fatal(err)
	}
	tn := obj.(*corev1.Node)
	got := tn.Annotations[api.ReportAnnotation]
	if strings.Contains(got, "inboundFrom") || strings.Contains(got, "encryptingTo") || len(got) > 300 ||
		tn.Annotations["other"] != "x" || tn.ManagedFields != nil || tn.Status.Images != nil {
		t.Errorf("trimmed node: report %d bytes %.200s, annotations %v", len(got), got, tn.Annotations)
	}
	after := NodeState(tn)
	if before.Report == nil || after.Report == nil || fmt.Sprintf("%+v", *before.Report) != fmt.Sprintf("%+v", *after.Report) ||
		before.BootID != after.BootID || after.ReportError != "" {
		t.Errorf("NodeState changed by the trim:\n%+v\n%+v", before, after)
	}
	tomb := cache.DeletedFinalStateUnknown{Key: "b"}
	if o, err := trimNode(tomb); err != nil || o != any(tomb) {
		t.Errorf("tombstone: %v %v", o, err)
	}
}
