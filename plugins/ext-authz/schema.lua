local function header_names(what, default)
  return { type = "array", default = default or {}, elements = { type = "string", min = 1 }, description = what }
end

return { fields = {
  url = { type = "string", required = true, min = 8,
          description = "the authorization service, http://host:port/path or https://... (certificate verified against the system CAs or ca_file; keep-alive connections)" },
  method = { type = "string", default = "GET", one_of = { "GET", "POST", "PUT", "HEAD" },
             description = "method of the authorization request" },
  request_headers = header_names("client request headers sent along (when present)", { "authorization" }),
  include_body = { type = "integer", default = 0, min = 0, max = 1048576,
                   description = "send at most this many bytes of the client's body as the authorization request's body (0: none)" },
  upstream_headers = header_names("authorization response headers copied to the upstream request when allowed"),
  client_headers_on_allow = header_names("authorization response headers copied to the client's response when allowed"),
  client_headers = header_names("authorization response headers copied to the client when denied", { "www-authenticate" }),
  deny_status = { type = "integer", min = 400, max = 599,
                  description = "status sent to a denied client (default: the authorization service's status)" },
  deny_body = { type = "string",
                description = "body sent to a denied client (default: the authorization service's body and content-type)" },
  ssl_verify = { type = "boolean", default = true,
                 description = "https: verify the authorization service's certificate chain and host name (false only for tests)" },
  ca_file = { type = "string", min = 1, required = false,
              description = "https: PEM file of the CAs trusted for the authorization service's certificate (default: the system's)" },
  timeout = { type = "number", default = 1, min = 0.001, max = 60,
              description = "seconds for connecting to and hearing back from the authorization service" },
  failure_mode_allow = { type = "boolean", default = false,
                         description = "when the service is down, times out or answers 5xx: true lets the request through, false answers status_on_error" },
  status_on_error = { type = "integer", default = 503, min = 400, max = 599,
                      description = "status for a failed authorization call when failure_mode_allow is false" },
} }
