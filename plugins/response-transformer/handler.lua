-- response-transformer: removes, renames, replaces, adds and appends
-- headers of the upstream's response, in that order, before it is sent to
-- the client; removes, renames, replaces and adds JSON body fields.
local weir = require "weir"

local ResponseTransformer = { PRIORITY = 800, VERSION = "1.0.0" }
-- The body_filter is only wanted (the proxy only re-frames responses) when
-- a JSON body op is configured.
ResponseTransformer.BODY_FILTER_IF = { "remove.json", "rename.json", "replace.json", "add.json" }

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

-- JSON body field operations: weir.json's field ops (lua/README.md) over the
-- `json` lists of remove/rename/replace/add.
local json = weir.json

local function has_json_ops(conf)
  return json.has_field_ops(conf.remove.json, conf.rename.json, conf.replace.json, conf.add.json)
end

-- The transformed body, or nil when it stays as it is (not a JSON object,
-- or no operation changed anything).
local function transform_json_body(conf, body)
  return json.transform_object(body, conf.remove.json, conf.rename.json, conf.replace.json, conf.add.json)
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

  -- JSON body ops: only for an uncompressed JSON body not known to be over
  -- the limit; body_filter then holds the body until its end.
  if has_json_ops(conf) and json.is_json_media_type(weir.response.get_header("content-type"))
      and not weir.response.get_header("content-encoding") then
    local length = tonumber(weir.response.get_header("content-length"))
    if not length or length <= conf.json_max_size then
      ctx.response_transformer_json = { parts = {}, size = 0 }
    end
  end
end

function ResponseTransformer:body_filter(conf, ctx)
  local held = ctx.response_transformer_json
  if not held then return end
  local chunk = weir.response.get_chunk()
  held.size = held.size + #chunk
  held.parts[#held.parts + 1] = chunk
  if held.size > conf.json_max_size then
    -- Over the limit: what was held goes out now, the rest passes as is.
    ctx.response_transformer_json = nil
    weir.response.set_chunk(table.concat(held.parts))
    return
  end
  if not weir.response.is_last_chunk() then
    weir.response.set_chunk("")
    return
  end
  ctx.response_transformer_json = nil
  local body = table.concat(held.parts)
  weir.response.set_chunk(transform_json_body(conf, body) or body)
end

return ResponseTransformer
