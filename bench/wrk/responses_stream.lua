-- A streamed OpenAI Responses call (POST /openai/v1/responses): the deployment is the body's
-- model. The path is set here; the URL wrk is given only names the host.
wrk.method = "POST"
wrk.path = "/openai/v1/responses"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Api-Key"] = os.getenv("BENCH_API_KEY") or "bench-key-0123456789abcdef"
wrk.body = '{"model":"bench-model","input":"Say hello","stream":true}'

dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "report.lua")
