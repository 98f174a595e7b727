// Package manifests embeds the install manifest, so that test harnesses and tools can
// read its objects (e.g. the NodeReport CRD) from the very file users apply.
package manifests

import _ "embed"

// Bundle is manifests/secureoverlay.yaml.
//
//go:embed secureoverlay.yaml
var Bundle []byte
