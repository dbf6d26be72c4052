-- Shared by the request scripts: wrk calls done() once at the end of a run; print the
-- summary as one JSON line so bench/run.py need not scrape wrk's human-readable output.
function done(summary, latency, requests)
  local e = summary.errors
  local p = function(q) return latency:percentile(q) end
  io.write(string.format(
    'WRK_JSON {"requests":%.0f,"duration_us":%.0f,"bytes":%.0f,'
      .. '"errors":{"connect":%.0f,"read":%.0f,"write":%.0f,"status":%.0f,"timeout":%.0f},'
      .. '"latency_us":{"mean":%.1f,"stdev":%.1f,"min":%.0f,"max":%.0f,'
      .. '"p50":%.0f,"p90":%.0f,"p99":%.0f,"p999":%.0f}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.stdev, latency.min, latency.max,
    p(50), p(90), p(99), p(99.9)))
end
