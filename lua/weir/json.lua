-- weir.json: a small JSON encoder/decoder in plain Lua (runs under the
-- state's instruction budget and memory cap like any plugin code).
--
-- encode(value) -> string | nil, err
-- decode(text)  -> value  | nil, err
-- json.null        decodes from / encodes to JSON null (keeps array positions)
-- json.empty_array encodes to [] (an empty Lua table encodes to {})
-- Decoded arrays carry a metatable (json.array_mt) so an empty one encodes
-- back to [] (decode -> change -> encode keeps the document's shape).
local json = {}

local null = setmetatable({}, { __tostring = function() return "json.null" end })
local empty_array = setmetatable({}, { __tostring = function() return "json.empty_array" end })
json.null = null
json.empty_array = empty_array
local array_mt = { __name = "json.array" }
json.array_mt = array_mt

local byte, char, find, format, sub, concat = string.byte, string.char, string.find, string.format, string.sub, table.concat
local math_type, huge, tostring, type, pairs, next = math.type, math.huge, tostring, type, pairs, next

local escapes = {
  ['"'] = '\\"', ['\\'] = '\\\\', ['\b'] = '\\b', ['\f'] = '\\f',
  ['\n'] = '\\n', ['\r'] = '\\r', ['\t'] = '\\t',
}
local function escape_char(c)
  return escapes[c] or format("\\u%04x", byte(c))
end

local function encode_string(s)
  return '"' .. s:gsub('[%c"\\]', escape_char) .. '"'
end

local function encode_number(n)
  if math_type(n) == "integer" then return format("%d", n) end
  if n ~= n or n == huge or n == -huge then
    error("cannot encode " .. tostring(n) .. " (JSON has no NaN or infinity)", 0)
  end
  local s = format("%.14g", n)
  if tonumber(s) ~= n then s = format("%.17g", n) end
  return s
end

local encode_value

local function encode_table(t, depth, buf)
  if depth > 100 then error("cannot encode: nesting deeper than 100 (cycle?)", 0) end
  if t == null then buf[#buf + 1] = "null"; return end
  if t == empty_array then buf[#buf + 1] = "[]"; return end
  if getmetatable(t) == array_mt and next(t) == nil then buf[#buf + 1] = "[]"; return end
  local n = #t
  local count = 0
  for _ in pairs(t) do count = count + 1 end
  if n > 0 and count == n then
    buf[#buf + 1] = "["
    for i = 1, n do
      if i > 1 then buf[#buf + 1] = "," end
      encode_value(t[i], depth + 1, buf)
    end
    buf[#buf + 1] = "]"
    return
  end
  -- An object: string keys (integer keys are written as strings), sorted so
  -- output is stable.
  local keys = {}
  for k in pairs(t) do
    local kt = type(k)
    if kt ~= "string" and kt ~= "number" then
      error("cannot encode a table with a " .. kt .. " key", 0)
    end
    keys[#keys + 1] = k
  end
  table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
  buf[#buf + 1] = "{"
  for i, k in ipairs(keys) do
    if i > 1 then buf[#buf + 1] = "," end
    buf[#buf + 1] = encode_string(tostring(k))
    buf[#buf + 1] = ":"
    encode_value(t[k], depth + 1, buf)
  end
  buf[#buf + 1] = "}"
end

encode_value = function(v, depth, buf)
  local vt = type(v)
  if vt == "nil" then buf[#buf + 1] = "null"
  elseif vt == "boolean" then buf[#buf + 1] = v and "true" or "false"
  elseif vt == "number" then buf[#buf + 1] = encode_number(v)
  elseif vt == "string" then buf[#buf + 1] = encode_string(v)
  elseif vt == "table" then encode_table(v, depth, buf)
  else error("cannot encode a " .. vt .. " value", 0) end
end

function json.encode(value)
  local buf = {}
  local ok, err = pcall(encode_value, value, 0, buf)
  if not ok then return nil, "json encode: " .. tostring(err) end
  return concat(buf)
end

-- Decoder: recursive descent over byte positions.

local function decode_error(text, pos, what)
  error(format("json decode: %s at position %d", what, pos), 0)
end

local function skip_ws(text, pos)
  local _, e = find(text, "^[ \t\r\n]*", pos)
  return e + 1
end

local function utf8_encode(cp)
  if cp < 0x80 then return char(cp) end
  if cp < 0x800 then return char(0xC0 | (cp >> 6), 0x80 | (cp & 0x3F)) end
  if cp < 0x10000 then return char(0xE0 | (cp >> 12), 0x80 | ((cp >> 6) & 0x3F), 0x80 | (cp & 0x3F)) end
  return char(0xF0 | (cp >> 18), 0x80 | ((cp >> 12) & 0x3F), 0x80 | ((cp >> 6) & 0x3F), 0x80 | (cp & 0x3F))
end

local simple_escapes = { ['"'] = '"', ['\\'] = '\\', ['/'] = '/', b = '\b', f = '\f', n = '\n', r = '\r', t = '\t' }

local function decode_string(text, pos)
  -- pos is at the opening quote
  local parts = {}
  local i = pos + 1
  while true do
    local s, e = find(text, '^[^"\\%c]*', i)
    if e >= s then parts[#parts + 1] = sub(text, s, e) end
    i = e + 1
    local c = sub(text, i, i)
    if c == '"' then return concat(parts), i + 1 end
    if c == "" then decode_error(text, pos, "unterminated string") end
    if c ~= "\\" then decode_error(text, i, "control character in string") end
    local esc = sub(text, i + 1, i + 1)
    if simple_escapes[esc] then
      parts[#parts + 1] = simple_escapes[esc]
      i = i + 2
    elseif esc == "u" then
      local hex = sub(text, i + 2, i + 5)
      if not find(hex, "^%x%x%x%x$") then decode_error(text, i, "bad \\u escape") end
      local cp = tonumber(hex, 16)
      i = i + 6
      if cp >= 0xD800 and cp <= 0xDBFF then
        local low = sub(text, i, i + 5)
        if find(low, "^\\u[dD][c-fC-F]%x%x$") then
          cp = 0x10000 + ((cp - 0xD800) << 10) + (tonumber(sub(low, 3), 16) - 0xDC00)
          i = i + 6
        else
          cp = 0xFFFD
        end
      elseif cp >= 0xDC00 and cp <= 0xDFFF then
        cp = 0xFFFD
      end
      parts[#parts + 1] = utf8_encode(cp)
    else
      decode_error(text, i, "bad escape")
    end
  end
end

local decode_value

local function decode_array(text, pos, depth)
  local result = setmetatable({}, array_mt)
  local n = 0
  pos = skip_ws(text, pos + 1)
  if sub(text, pos, pos) == "]" then return result, pos + 1 end
  while true do
    local v
    v, pos = decode_value(text, pos, depth + 1)
    n = n + 1
    result[n] = v
    pos = skip_ws(text, pos)
    local c = sub(text, pos, pos)
    if c == "]" then return result, pos + 1 end
    if c ~= "," then decode_error(text, pos, "expected ',' or ']'") end
    pos = skip_ws(text, pos + 1)
  end
end

local function decode_object(text, pos, depth)
  local result = {}
  pos = skip_ws(text, pos + 1)
  if sub(text, pos, pos) == "}" then return result, pos + 1 end
  while true do
    if sub(text, pos, pos) ~= '"' then decode_error(text, pos, "expected a string key") end
    local key
    key, pos = decode_string(text, pos)
    pos = skip_ws(text, pos)
    if sub(text, pos, pos) ~= ":" then decode_error(text, pos, "expected ':'") end
    local v
    v, pos = decode_value(text, skip_ws(text, pos + 1), depth + 1)
    result[key] = v
    pos = skip_ws(text, pos)
    local c = sub(text, pos, pos)
    if c == "}" then return result, pos + 1 end
    if c ~= "," then decode_error(text, pos, "expected ',' or '}'") end
    pos = skip_ws(text, pos + 1)
  end
end

decode_value = function(text, pos, depth)
  if depth > 200 then decode_error(text, pos, "nesting deeper than 200") end
  local c = sub(text, pos, pos)
  if c == "{" then return decode_object(text, pos, depth) end
  if c == "[" then return decode_array(text, pos, depth) end
  if c == '"' then return decode_string(text, pos) end
  if find(text, "^true", pos) then return true, pos + 4 end
  if find(text, "^false", pos) then return false, pos + 5 end
  if find(text, "^null", pos) then return null, pos + 4 end
  local s, e = find(text, "^-?%d+%.?%d*[eE]?[-+]?%d*", pos)
  if s then
    local literal = sub(text, s, e)
    local n = tonumber(literal)
    if n == nil then decode_error(text, pos, "bad number") end
    return n, e + 1
  end
  if c == "" then decode_error(text, pos, "unexpected end of input") end
  decode_error(text, pos, "unexpected character '" .. c .. "'")
end

function json.decode(text)
  if type(text) ~= "string" then
    return nil, "json decode: expected a string, got " .. type(text)
  end
  local ok, value, pos = pcall(function()
    local v, p = decode_value(text, skip_ws(text, 1), 0)
    return v, skip_ws(text, p)
  end)
  if not ok then return nil, value end
  if pos <= #text then return nil, format("json decode: trailing garbage at position %d", pos) end
  return value
end

-- Field operations on a decoded JSON object, shared by the transformer
-- plugins and open to operators' plugins. Paths are dot-separated keys into
-- nested objects ("user.password"). The four lists are passed separately
-- (any may be nil) so a per-request check allocates nothing:
--   remove  {path, ...}          delete the field if present
--   rename  {old_path = new_path} move a present field (creating objects)
--   replace {path = value}        set a field only if present
--   add     {path = value}        set a field only if absent (creating objects)

function json.is_object(v)
  return type(v) == "table" and v ~= null and getmetatable(v) ~= array_mt
end

-- True for application/json and application/*+json (parameters ignored; a
-- list of header lines is judged by its first).
function json.is_json_media_type(content_type)
  if type(content_type) == "table" then content_type = content_type[1] end
  if type(content_type) ~= "string" then return false end
  local media = content_type:match("^%s*([^;%s]+)")
  if not media then return false end
  media = media:lower()
  return media == "application/json" or (media:match("^application/[%w.+-]+%+json$") ~= nil)
end

function json.has_field_ops(remove, rename, replace, add)
  return (remove ~= nil and next(remove) ~= nil) or (rename ~= nil and next(rename) ~= nil)
      or (replace ~= nil and next(replace) ~= nil) or (add ~= nil and next(add) ~= nil)
end

-- The object holding the path's last key (nil if a step is missing or not
-- an object; with `create`, missing steps become objects), and that key.
local function parent_of(doc, path, create)
  local keys = {}
  for key in path:gmatch("[^.]+") do keys[#keys + 1] = key end
  local node = doc
  for i = 1, #keys - 1 do
    local child = node[keys[i]]
    if child == nil and create then
      child = {}
      node[keys[i]] = child
    end
    if not json.is_object(child) then return nil end
    node = child
  end
  return node, keys[#keys]
end

-- Applies remove, rename, replace, add (in that order) to `doc`, an object;
-- returns true if anything changed.
function json.apply_field_ops(doc, remove, rename, replace, add)
  local changed = false
  for _, path in ipairs(remove or {}) do
    local parent, key = parent_of(doc, path)
    if parent and parent[key] ~= nil then parent[key] = nil; changed = true end
  end
  for old, new in pairs(rename or {}) do
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
  for path, value in pairs(replace or {}) do
    local parent, key = parent_of(doc, path)
    if parent and parent[key] ~= nil then parent[key] = value; changed = true end
  end
  for path, value in pairs(add or {}) do
    local parent, key = parent_of(doc, path, true)
    if parent and parent[key] == nil then parent[key] = value; changed = true end
  end
  return changed
end

-- `text` with the field operations applied, or nil when it stays as it is
-- (not JSON, not an object, or no operation changed anything).
function json.transform_object(text, remove, rename, replace, add)
  local doc = json.decode(text)
  if not json.is_object(doc) or not json.apply_field_ops(doc, remove, rename, replace, add) then return nil end
  return json.encode(doc)
end

return json
