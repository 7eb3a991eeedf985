-- wrk script for benchmarks/run.py: POST the JSON body in $BENCH_BODY; count answers that are not
-- 200 (by status) and 200 answers holding $BENCH_MARKER (a degraded answer); print one BENCH line at the end.
--
-- A rotation instead: $BENCH_BODIES lists body files, one a line; each thread sends them in turn
-- (the second thread from the middle of the list). Wherever a body holds $BENCH_TAG, each call
-- writes a value of its own there: $BENCH_SEED (one per wrk run), the thread's number and a count.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local marker = os.getenv("BENCH_MARKER") or ""
local list = os.getenv("BENCH_BODIES")

local function read(path)
  local file = assert(io.open(path, "rb"))
  local text = file:read("*a")
  file:close()
  return text
end

if not list then
  wrk.body = read(os.getenv("BENCH_BODY"))
end

local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("number", #threads)
end

function init(args)
  bad_status = 0
  degraded = 0
  codes = {}
  code_list = ""
  if list then
    load_rotation()
  end
end

-- Each body as the pieces between its tags (one piece: no tag), read in the thread that sends them.
function load_rotation()
  local tag = os.getenv("BENCH_TAG") or ""
  bodies = {}
  for path in io.lines(list) do
    local text, pieces, from = read(path), {}, 1
    while tag ~= "" do
      local at = string.find(text, tag, from, true)
      if not at then
        break
      end
      table.insert(pieces, string.sub(text, from, at - 1))
      from = at + #tag
    end
    table.insert(pieces, string.sub(text, from))
    table.insert(bodies, pieces)
  end
  turn = ((number or 1) - 1) * math.floor(#bodies / 2)
  calls = 0
  prefix = (os.getenv("BENCH_SEED") or "s") .. "t" .. (number or 1) .. "n"
end

if list then
  function request()
    turn = turn % #bodies + 1
    local pieces = bodies[turn]
    local body = pieces[1]
    if #pieces > 1 then
      calls = calls + 1
      body = table.concat(pieces, prefix .. calls)
    end
    return wrk.format(nil, nil, nil, body)
  end
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
