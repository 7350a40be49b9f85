-- request-id: gives every request an id (trusted from the client, or newly
-- generated), sends it upstream and echoes it to the client. The id is also
-- left in ctx.request_id for later plugins.
local weir = require "weir"

local RequestID = { PRIORITY = 100001, VERSION = "1.0.0" }

local function uuid4()
  local b = { weir.crypto.random_bytes(16):byte(1, 16) }
  b[7] = (b[7] & 0x0f) | 0x40   -- version 4
  b[9] = (b[9] & 0x3f) | 0x80   -- RFC 4122 variant
  local hex = weir.crypto.hex(string.char(table.unpack(b)))
  return hex:sub(1, 8) .. "-" .. hex:sub(9, 12) .. "-" .. hex:sub(13, 16) .. "-" .. hex:sub(17, 20) .. "-" .. hex:sub(21, 32)
end

-- Printable ASCII without spaces: safe to log and to forward.
local function acceptable(id, conf)
  return #id > 0 and #id <= conf.max_length and not id:find("[^\33-\126]")
end

function RequestID:request(conf, ctx)
  local id = conf.trust_incoming and weir.request.get_header(conf.header_name) or nil
  if not id or not acceptable(id, conf) then
    id = conf.generator == "uuid" and uuid4() or weir.request.get_id()
  end
  ctx.request_id = id
  weir.upstream.request.set_header(conf.header_name, id)
  if conf.echo_downstream then weir.response.set_header(conf.header_name, id) end
end

-- The response phase runs for upstream answers and early exits alike; setting
-- the header again here makes sure the echo wins over the upstream's own.
function RequestID:response(conf, ctx)
  if conf.echo_downstream and ctx.request_id then weir.response.set_header(conf.header_name, ctx.request_id) end
end

return RequestID
