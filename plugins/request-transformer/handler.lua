-- request-transformer: removes, renames, replaces, adds and appends headers
-- and query arguments of the request sent upstream, in that order, and
-- removes, renames, replaces and adds JSON body fields. It works on the
-- upstream request as earlier plugins left it (so it never undoes, say,
-- key-auth hiding the key).
local weir = require "weir"

local RequestTransformer = { PRIORITY = 801, VERSION = "1.0.0" }

local EMPTY = {}

local function section(conf, operation, target)
  local op = conf[operation]
  return op and op[target] or EMPTY
end

-- Applies the five operations to `model` (name -> string | list; query
-- flags are true) and returns the set of names that changed. `key` maps a
-- configured name onto the model's (header names are case-insensitive).
local function transform(conf, target, model, key)
  local touched = {}
  for _, name in ipairs(section(conf, "remove", target)) do
    name = key(name)
    if model[name] ~= nil then model[name] = nil; touched[name] = true end
  end
  for old, new in pairs(section(conf, "rename", target)) do
    old, new = key(old), key(new)
    if model[old] ~= nil and old ~= new then
      model[new], model[old] = model[old], nil
      touched[old], touched[new] = true, true
    end
  end
  for name, value in pairs(section(conf, "replace", target)) do
    name = key(name)
    if model[name] ~= nil then model[name] = value; touched[name] = true end
  end
  for name, value in pairs(section(conf, "add", target)) do
    name = key(name)
    if model[name] == nil then model[name] = value; touched[name] = true end
  end
  for name, value in pairs(section(conf, "append", target)) do
    name = key(name)
    local existing = model[name]
    if existing == nil then
      model[name] = value
    elseif type(existing) == "table" then
      existing[#existing + 1] = value
    else
      -- A bare query flag (true) becomes an empty value next to the new one.
      model[name] = { existing == true and "" or existing, value }
    end
    touched[name] = true
  end
  return touched
end

local function same(name) return name end

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

-- Reads the client's body (at most json_max_size + 1 bytes) and, when it is
-- a JSON object within the limit that the ops change, sends the new one
-- (set_body fixes Content-Length and drops Transfer-Encoding).
local function transform_request_body(conf)
  if not json.is_json_media_type(weir.request.get_header("content-type")) then return end
  local body = weir.request.get_body(conf.json_max_size + 1)
  if not body or #body > conf.json_max_size then return end
  local out = transform_json_body(conf, body)
  if out then weir.upstream.request.set_body(out) end
end

function RequestTransformer:request(conf, ctx)
  local headers = weir.upstream.request.get_headers()
  for name in pairs(transform(conf, "headers", headers, string.lower)) do
    weir.upstream.request.clear_header(name)
    local value = headers[name]
    if type(value) == "table" then
      for _, line in ipairs(value) do weir.upstream.request.add_header(name, line) end
    elseif value ~= nil then
      weir.upstream.request.set_header(name, value)
    end
  end

  -- All arguments are kept (no max_args cut): the query is re-encoded whole.
  local query = weir.upstream.request.get_query(math.maxinteger)
  if next(transform(conf, "querystring", query, same)) ~= nil then
    weir.upstream.request.set_query(next(query) ~= nil and query or nil)
  end

  if has_json_ops(conf) then transform_request_body(conf) end
end

return RequestTransformer
