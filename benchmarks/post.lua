-- wrk script for benchmarks/run.py: POST the JSON body in $BENCH_BODY; count answers that are not
-- 200 (by status) and 200 answers holding $BENCH_MARKER (a degraded answer); print one BENCH line at the end.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local file = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
wrk.body = file:read("*a")
file:close()
local marker = os.getenv("BENCH_MARKER") or ""

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  bad_status = 0
  degraded = 0
  codes = {}
  code_list = ""
end

function response(status, headers, body)
  if status ~= 200 then
    bad_status = bad_status + 1
    codes[status] = (codes[status] or 0) + 1
    local parts = {}
    for code, n in pairs(codes) do
      table.insert(parts, code .. ":" .. n)
    end
    code_list = table.concat(parts, ",")
  elseif marker ~= "" and body and string.find(body, marker, 1, true) then
    degraded = degraded + 1
  end
end

function done(summary, latency, requests)
  local bad, worse, lists = 0, 0, {}
  for _, thread in ipairs(threads) do
    bad = bad + thread:get("bad_status")
    worse = worse + thread:get("degraded")
    local list = thread:get("code_list")
    if list ~= "" then
      table.insert(lists, list)
    end
  end
  local e = summary.errors
  local statuses = table.concat(lists, ",")
  io.write(string.format(
    "BENCH requests=%d duration_us=%d p50_us=%d p99_us=%d bad_status=%d degraded=%d connect=%d read=%d write=%d timeout=%d statuses=%s\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), bad, worse,
    e.connect, e.read, e.write, e.timeout, statuses == "" and "-" or statuses))
end
