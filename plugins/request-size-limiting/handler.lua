-- request-size-limiting: refuses requests whose declared body size
-- (Content-Length) exceeds the limit with 413, before the body is read or
-- the upstream is contacted.
local weir = require "weir"

local RequestSizeLimiting = { PRIORITY = 951, VERSION = "1.0.0" }

local UNIT = { bytes = 1, kilobytes = 1024, megabytes = 1024 * 1024 }

function RequestSizeLimiting:request(conf, ctx)
  local limit = conf.allowed_payload_size * UNIT[conf.size_unit]
  local declared = weir.request.get_header("content-length")
  if declared then
    -- The proxy's HTTP parser has already refused malformed values; a
    -- number too large for an integer is still "too large".
    local size = tonumber(declared)
    if not size or size > limit then
      return 413, { message = "Request size limit exceeded" }
    end
  elseif conf.require_content_length and weir.request.get_header("transfer-encoding") then
    return 411, { message = "A valid Content-Length header is required" }
  end
end

return RequestSizeLimiting
