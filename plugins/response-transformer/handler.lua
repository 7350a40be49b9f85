-- response-transformer: removes, renames, replaces, adds and appends
-- headers of the upstream's response, in that order, before it is sent to
-- the client.
local weir = require "weir"

local ResponseTransformer = { PRIORITY = 800, VERSION = "1.0.0" }

local EMPTY = {}

local function section(conf, operation)
  local op = conf[operation]
  return op and op.headers or EMPTY
end

-- Applies the five operations to `model` (lower-case name -> string | list)
-- and returns the set of names that changed.
local function transform(conf, model)
  local touched = {}
  local lower = string.lower
  for _, name in ipairs(section(conf, "remove")) do
    name = lower(name)
    if model[name] ~= nil then model[name] = nil; touched[name] = true end
  end
  for old, new in pairs(section(conf, "rename")) do
    old, new = lower(old), lower(new)
    if model[old] ~= nil and old ~= new then
      model[new], model[old] = model[old], nil
      touched[old], touched[new] = true, true
    end
  end
  for name, value in pairs(section(conf, "replace")) do
    name = lower(name)
    if model[name] ~= nil then model[name] = value; touched[name] = true end
  end
  for name, value in pairs(section(conf, "add")) do
    name = lower(name)
    if model[name] == nil then model[name] = value; touched[name] = true end
  end
  for name, value in pairs(section(conf, "append")) do
    name = lower(name)
    local existing = model[name]
    if existing == nil then model[name] = value
    elseif type(existing) == "table" then existing[#existing + 1] = value
    else model[name] = { existing, value } end
    touched[name] = true
  end
  return touched
end

function ResponseTransformer:response(conf, ctx)
  local headers = weir.response.get_headers()
  for name in pairs(transform(conf, headers)) do
    weir.response.clear_header(name)
    local value = headers[name]
    if type(value) == "table" then
      for _, line in ipairs(value) do weir.response.add_header(name, line) end
    elseif value ~= nil then
      weir.response.set_header(name, value)
    end
  end
end

return ResponseTransformer
