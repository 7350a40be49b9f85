return { fields = {
  header_name = { type = "string", min = 1, default = "x-request-id",
                  description = "header carrying the id: read from the client (when trusted), set on the upstream request and echoed in the response" },
  trust_incoming = { type = "boolean", default = true,
                     description = "keep a well-formed id sent by the client instead of generating one" },
  generator = { type = "string", default = "uuid", one_of = { "uuid", "gateway" },
                description = "how new ids are made: uuid = random UUID v4; gateway = the gateway's own request id (weir.request.get_id, as in its logs)" },
  echo_downstream = { type = "boolean", default = true, description = "send the id back in the response" },
  max_length = { type = "integer", min = 1, max = 1024, default = 200,
                 description = "longest incoming id that is trusted; longer or non-printable ones are replaced" },
} }
