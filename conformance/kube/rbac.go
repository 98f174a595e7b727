package kube

import (
	"context"
	"fmt"
	"testing"
	"time"

	authorizationv1 "k8s.io/api/authorization/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// WaitAuthorized blocks until the API server's authorizer allows user (in groups) the
// access attrs describes, or timeout passes. The RBAC authorizer learns new Roles and
// bindings from an informer, so a check made the moment after they are created can
// still see the old rules (a loaded machine showed "allowed=false" right after a
// ClusterRoleBinding was created). Tests that create RBAC and then assert on it, or run
// a client under it, wait here first. It returns how long the wait took.
func WaitAuthorized(ctx context.Context, cs kubernetes.Interface, user string, groups []string, attrs authorizationv1.ResourceAttributes, timeout time.Duration) (time.Duration, error) {
	return waitAccess(ctx, cs, user, groups, attrs, timeout, true)
}

// waitAccess blocks until the authorizer's answer for user (in groups) and attrs is
// allowed, or timeout passes.
func waitAccess(ctx context.Context, cs kubernetes.Interface, user string, groups []string, attrs authorizationv1.ResourceAttributes, timeout time.Duration, allowed bool) (time.Duration, error) {
	start := time.Now()
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var last string
	for {
		sar := &authorizationv1.SubjectAccessReview{Spec: authorizationv1.SubjectAccessReviewSpec{
			User: user, Groups: groups, ResourceAttributes: &attrs}}
		got, err := cs.AuthorizationV1().SubjectAccessReviews().Create(ctx, sar, metav1.CreateOptions{})
		switch {
		case err != nil:
			last = err.Error()
		case got.Status.Allowed == allowed:
			return time.Since(start), nil
		case got.Status.Allowed:
			last = "allowed"
		default:
			last = fmt.Sprintf("denied (%s)", got.Status.Reason)
		}
		select {
		case <-ctx.Done():
			want := "authorized"
			if !allowed {
				want = "denied"
			}
			return time.Since(start), fmt.Errorf("%s %s %s.%s %s/%s not %s after %v: %s",
				user, attrs.Verb, attrs.Resource, attrs.Group, attrs.Namespace, attrs.Name, want, timeout, last)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// ServiceAccountGroups are the groups the API server gives a ServiceAccount's token.
func ServiceAccountGroups(ns string) []string {
	return []string{"system:serviceaccounts", "system:serviceaccounts:" + ns, "system:authenticated"}
}

// RequireAuthorized waits (up to 30 s each) until every access in attrs is allowed to
// user in groups, and fails the test otherwise: call it after creating RBAC that the
// rest of the test relies on.
func RequireAuthorized(t testing.TB, cs kubernetes.Interface, user string, groups []string, attrs ...authorizationv1.ResourceAttributes) {
	t.Helper()
	for _, a := range attrs {
		took, err := WaitAuthorized(context.Background(), cs, user, groups, a, 30*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if took > 100*time.Millisecond {
			t.Logf("rbac: %s %s %s in effect after %v", user, a.Verb, a.Resource, took.Round(time.Millisecond))
		}
	}
}

// RequireDenied is RequireAuthorized for RBAC taken away: it waits (up to 30 s each) until
// every access in attrs is denied to user in groups (the authorizer's informer may still
// hold the old rules for a moment after a Role is updated).
func RequireDenied(t testing.TB, cs kubernetes.Interface, user string, groups []string, attrs ...authorizationv1.ResourceAttributes) {
	t.Helper()
	for _, a := range attrs {
		if _, err := waitAccess(context.Background(), cs, user, groups, a, 30*time.Second, false); err != nil {
			t.Fatal(err)
		}
	}
}

// ServiceAccountUser is the user name the API server gives a ServiceAccount's token.
func ServiceAccountUser(ns, name string) string { return "system:serviceaccount:" + ns + ":" + name }
