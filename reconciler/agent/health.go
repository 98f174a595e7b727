package agent

import (
	"fmt"
	"net/http"

	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Handler serves /healthz, /readyz and /metrics.
//   - /healthz: 200 while the process is alive and no sync has been running for longer
//     than the wedge timeout (a liveness probe restarts a wedged agent; a restart does
//     not touch the data plane).
//   - /readyz: 200 once every cache has synced, the last sync succeeded and the report
//     writer has written this process's first report and its last write did not fail;
//     otherwise 503 with the reason (a failed write reads "last sync failed: write
//     report: …"; never key material: errors name objects only).
//   - /metrics: the agent's Prometheus registry.
func (a *Agent) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		if s := a.Status(); !s.Healthy {
			http.Error(w, fmt.Sprintf("sync running for longer than %s", a.cfg.WedgeTimeout), http.StatusServiceUnavailable)
			return
		}
		_, _ = fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		s := a.Status()
		switch {
		case !s.Synced:
			msg := "caches not synced"
			if err := a.d.Source.Err(); err != nil {
				msg += ": " + err.Error()
			}
			http.Error(w, msg, http.StatusServiceUnavailable)
		case !s.Ready:
			http.Error(w, "last sync failed: "+s.Error, http.StatusServiceUnavailable)
		default:
			_, _ = fmt.Fprintln(w, "ok")
		}
	})
	mux.Handle("/metrics", promhttp.HandlerFor(a.d.Metrics.Registry, promhttp.HandlerOpts{}))
	return mux
}
