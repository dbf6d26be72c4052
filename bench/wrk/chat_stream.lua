-- The same chat completion as chat.lua, streamed (server-sent events).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Api-Key"] = os.getenv("BENCH_API_KEY") or "bench-key-0123456789abcdef"
wrk.body = '{"model":"bench-model","messages":[{"role":"user","content":"Say hello"}],'
  .. '"stream":true}'

-- report.lua sits beside this script; wrk gives no other way to find it.
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "report.lua")
