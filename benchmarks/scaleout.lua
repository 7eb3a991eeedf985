-- wrk script for benchmarks/scaleout.py: a mixed workload, bodies from files named in BODIES_DIR.
-- Of every 10 calls: 6 out-of-scope patient-views (small prefetch, no cards), 3 patient-views of a
-- CRS grade 3 patient (cards), 1 feedback post.
local dir = os.getenv("BODIES_DIR")
local function read(name)
  local f = assert(io.open(dir .. "/" .. name, "rb"))
  local text = f:read("*a")
  f:close()
  return text
end
local out_of_scope, graded, feedback = read("out_of_scope.json"), read("graded.json"), read("feedback.json")
local headers = {["Content-Type"] = "application/json"}
local service = "/cds-services/crs-icans-assessment"
local plan = {0, 1, 0, 0, 1, 0, 2, 0, 1, 0}
local n = 0
local statuses = {}

request = function()
  n = n + 1
  local kind = plan[(n % 10) + 1]
  if kind == 0 then return wrk.format("POST", service, headers, out_of_scope) end
  if kind == 1 then return wrk.format("POST", service, headers, graded) end
  return wrk.format("POST", service .. "/feedback", headers, feedback)
end

response = function(status, headers, body)
  if status ~= 200 then
    statuses[status] = (statuses[status] or 0) + 1
  end
end
