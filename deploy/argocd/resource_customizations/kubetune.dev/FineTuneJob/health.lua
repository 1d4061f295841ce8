-- Argo CD health of a kubetune.dev FineTuneJob, from its status (Lua 5.1, as Argo CD runs it).
--   Succeeded                       -> Healthy (the adapter version is published)
--   Pending, Running, no status yet -> Progressing
--   status older than the spec      -> Progressing (the operator has not seen the change yet)
--   Suspended                       -> Suspended
--   Failed                          -> Degraded, with the Failed condition's message
-- Missing is Argo CD's own verdict for an object that does not exist; a live object is never Missing.
local hs = {}

local function condition(status, type)
  if status == nil or status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == type then
      return c
    end
  end
  return nil
end

local status = obj.status
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetune operator to pick up the FineTuneJob"
  return hs
end

local generation = obj.metadata.generation
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "The operator has not observed generation " .. tostring(generation) .. " yet"
  return hs
end

local phase = status.phase
if phase == "Succeeded" then
  hs.status = "Healthy"
  if status.adapter ~= nil and status.adapter.reference ~= nil then
    hs.message = "Published " .. status.adapter.reference
  else
    hs.message = "Succeeded"
  end
elseif phase == "Failed" then
  hs.status = "Degraded"
  local failed = condition(status, "Failed")
  if failed ~= nil and failed.message ~= nil and failed.message ~= "" then
    hs.message = failed.message
  else
    hs.message = "Failed"
  end
elseif phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = "spec.suspend is true"
elseif phase == "Running" then
  hs.status = "Progressing"
  if status.progress ~= nil and status.progress.display ~= nil then
    hs.message = "Training: " .. status.progress.display
  else
    hs.message = "Training"
  end
elseif phase == "Pending" then
  hs.status = "Progressing"
  local ready = condition(status, "Ready")
  if ready ~= nil and ready.message ~= nil and ready.message ~= "" then
    hs.message = ready.message
  else
    hs.message = "Waiting for the trainer pod"
  end
else
  hs.status = "Unknown"
  hs.message = "Unknown phase " .. tostring(phase)
end
return hs
