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

-- JSON body field operations (the same code is in request-transformer and
-- response-transformer; keep them in step). Paths are dot-separated keys
-- into nested objects ("user.password").
local json = weir.json
local JSON_OPS = { "remove", "rename", "replace", "add" }

local function has_json_ops(conf)
  for _, op in ipairs(JSON_OPS) do
    local section = conf[op] and conf[op].json
    if section and next(section) ~= nil then return true end
  end
  return false
end

local function is_object(v)
  return type(v) == "table" and v ~= json.null and getmetatable(v) ~= json.array_mt
end

local function is_json_type(content_type)
  if type(content_type) == "table" then content_type = content_type[1] end
  if type(content_type) ~= "string" then return false end
  local media = content_type:match("^%s*([^;%s]+)")
  if not media then return false end
  media = media:lower()
  return media == "application/json" or (media:match("^application/[%w.+-]+%+json$") ~= nil)
end

local function split(path)
  local keys = {}
  for key in path:gmatch("[^.]+") do keys[#keys + 1] = key end
  return keys
end

-- The object holding the path's last key (nil if a step is missing or not
-- an object; with `create`, missing steps become objects), and that key.
local function parent_of(doc, path, create)
  local keys = split(path)
  local node = doc
  for i = 1, #keys - 1 do
    local child = node[keys[i]]
    if child == nil and create then
      child = {}
      node[keys[i]] = child
    end
    if not is_object(child) then return nil end
    node = child
  end
  return node, keys[#keys]
end

-- Applies remove, rename, replace, add to `doc` (an object); true if changed.
local function apply_json_ops(conf, doc)
  local changed = false
  for _, path in ipairs(conf.remove.json or {}) do
    local parent, key = parent_of(doc, path)
    if parent and parent[key] ~= nil then parent[key] = nil; changed = true end
  end
  for old, new in pairs(conf.rename.json or {}) do
    local from, old_key = parent_of(doc, old)
    if from and from[old_key] ~= nil and old ~= new then
      local value = from[old_key]
      local to, new_key = parent_of(doc, new, true)
      if to then
        from[old_key] = nil
        to[new_key] = value
        changed = true
      end
    end
  end
  for path, value in pairs(conf.replace.json or {}) do
    local parent, key = parent_of(doc, path)
    if parent and parent[key] ~= nil then parent[key] = value; changed = true end
  end
  for path, value in pairs(conf.add.json or {}) do
    local parent, key = parent_of(doc, path, true)
    if parent and parent[key] == nil then parent[key] = value; changed = true end
  end
  return changed
end

-- The transformed body, or nil when it stays as it is (not a JSON object,
-- or no operation changed anything).
local function transform_json_body(conf, body)
  local doc = json.decode(body)
  if not is_object(doc) or not apply_json_ops(conf, doc) then return nil end
  return json.encode(doc)
end

-- Reads the client's body (at most json_max_size + 1 bytes) and, when it is
-- a JSON object within the limit that the ops change, sends the new one
-- (set_body fixes Content-Length and drops Transfer-Encoding).
local function transform_request_body(conf)
  if not is_json_type(weir.request.get_header("content-type")) then return end
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
