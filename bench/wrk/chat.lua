-- A small non-streaming chat completion, as bench/run.py sends it to every target.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Api-Key"] = os.getenv("BENCH_API_KEY") or "bench-key-0123456789abcdef"
wrk.body = '{"model":"bench-model","messages":[{"role":"user","content":"Say hello"}]}'

-- report.lua sits beside this script; wrk gives no other way to find it.
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "report.lua")
