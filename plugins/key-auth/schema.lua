return { fields = {
  key_names = { type = "array", elements = { type = "string", min = 1 }, min = 1, default = { "apikey" },
                description = "header and query-argument names the key may arrive under, tried in order" },
  key_in_header = { type = "boolean", default = true, description = "look for the key in request headers" },
  key_in_query = { type = "boolean", default = true, description = "look for the key in query arguments" },
  hide_credentials = { type = "boolean", default = true,
                       description = "remove the key (header and query argument) from the request sent upstream" },
  anonymous = { type = "string", required = false,
                description = "consumer name used when the key is missing or wrong, instead of answering 401" },
  run_on_preflight = { type = "boolean", default = true,
                       description = "also authenticate CORS preflight (OPTIONS) requests" },
  realm = { type = "string", default = "weir", description = "realm sent in WWW-Authenticate on a 401" },
} }
