local string_list = function(default, description)
  return { type = "array", elements = { type = "string", min = 1 }, default = default, description = description }
end

return { fields = {
  origins = string_list({}, "allowed origins: exact (https://app.example.com, compared case-insensitively), '*' for any, or a pattern where * stands for any run of letters, digits, '-' and '.' (https://*.example.com); empty = any"),
  methods = string_list({ "GET", "HEAD", "PUT", "PATCH", "POST", "DELETE", "OPTIONS", "TRACE", "CONNECT" },
                        "methods announced in Access-Control-Allow-Methods"),
  headers = string_list({}, "request headers announced in Access-Control-Allow-Headers; empty = echo the preflight's Access-Control-Request-Headers"),
  exposed_headers = string_list({}, "response headers listed in Access-Control-Expose-Headers"),
  credentials = { type = "boolean", default = false,
                  description = "send Access-Control-Allow-Credentials: true (the origin is then echoed instead of '*')" },
  max_age = { type = "integer", min = 0, required = false, description = "seconds a preflight answer may be cached (Access-Control-Max-Age)" },
  preflight_continue = { type = "boolean", default = false,
                         description = "forward preflight requests upstream instead of answering them at the gateway" },
} }
