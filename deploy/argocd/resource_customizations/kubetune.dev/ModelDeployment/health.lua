-- Argo CD health of a kubetune.dev ModelDeployment, from its status (Lua 5.1, as Argo CD runs it).
--   Ready with the Ready condition True        -> Healthy
--   Pending, Progressing, no status yet        -> Progressing (with the rollout in progress)
--   status older than the spec                 -> Progressing (the operator has not seen the change yet)
--   a rollout paused through spec.rollout      -> Suspended
--   Ready reason ProgressDeadlineExceeded      -> Degraded (pods stuck, e.g. Unschedulable or
--                                                 ImagePullBackOff, past spec.progressDeadlineSeconds)
--   Degraded (a rollout failed; the previous version serves), Failed (nothing serves) -> Degraded
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

local function describe_rollout(r)
  if r == nil then
    return nil
  end
  local text = "rollout of " .. tostring(r.adapter) .. " to v" .. tostring(r.toVersion) .. " " .. tostring(r.state)
  if r.message ~= nil and r.message ~= "" then
    text = text .. ": " .. r.message
  elseif r.reason ~= nil and r.reason ~= "" then
    text = text .. ": " .. r.reason
  end
  return text
end

local status = obj.status
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetune operator to pick up the ModelDeployment"
  return hs
end

local generation = obj.metadata.generation
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "The operator has not observed generation " .. tostring(generation) .. " yet"
  return hs
end

local phase = status.phase
local rollout = status.rollout
local in_flight = rollout ~= nil and (rollout.state == "Progressing" or rollout.state == "Canary")
local paused = obj.spec ~= nil and obj.spec.rollout ~= nil and obj.spec.rollout.paused == true
local ready = condition(status, "Ready")

if ready ~= nil and ready.status == "False" and ready.reason == "ProgressDeadlineExceeded" then
  -- Waiting longer changes nothing: someone has to act (capacity, image, spec).
  hs.status = "Degraded"
  hs.message = (ready.message ~= nil and ready.message ~= "" and ready.message) or "ProgressDeadlineExceeded"
elseif paused and in_flight then
  hs.status = "Suspended"
  hs.message = "Paused: " .. describe_rollout(rollout)
elseif phase == "Ready" and ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = "Serving " .. tostring(status.servingDisplay or "") .. " on " .. tostring(status.readyDisplay or "?") .. " replicas"
elseif phase == "Ready" or phase == "Pending" or phase == "Progressing" then
  hs.status = "Progressing"
  hs.message = describe_rollout(in_flight and rollout or nil)
    or (ready ~= nil and ready.message ~= "" and ready.message)
    or ("Replicas ready: " .. tostring(status.readyDisplay or "0"))
elseif phase == "Degraded" or phase == "Failed" then
  hs.status = "Degraded"
  local rollout_failed = rollout ~= nil and (rollout.state == "RolledBack" or rollout.state == "Failed")
  hs.message = (rollout_failed and describe_rollout(rollout))
    or (ready ~= nil and ready.message ~= nil and ready.message ~= "" and ready.message)
    or phase
else
  hs.status = "Unknown"
  hs.message = "Unknown phase " .. tostring(phase)
end
return hs
