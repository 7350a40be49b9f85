return { fields = {
  allowed_payload_size = { type = "integer", min = 0, default = 128,
                           description = "largest request body allowed, in size_unit" },
  size_unit = { type = "string", default = "megabytes", one_of = { "megabytes", "kilobytes", "bytes" },
                description = "unit of allowed_payload_size (1 kilobyte = 1024 bytes)" },
  require_content_length = { type = "boolean", default = false,
                             description = "refuse (411) a request with a body but no Content-Length (chunked), whose size cannot be checked up front" },
} }
