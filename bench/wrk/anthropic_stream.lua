-- A streamed Anthropic Messages call (POST /anthropic/v1/messages): the deployment is the
-- body's model. The path is set here; the URL wrk is given only names the host.
wrk.method = "POST"
wrk.path = "/anthropic/v1/messages"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["x-api-key"] = os.getenv("BENCH_API_KEY") or "bench-key-0123456789abcdef"
wrk.headers["anthropic-version"] = "2023-06-01"
wrk.body = '{"model":"bench-model","max_tokens":64,'
  .. '"messages":[{"role":"user","content":"Say hello"}],"stream":true}'

dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "report.lua")
