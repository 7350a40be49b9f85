return { fields = {
  hide_credentials = { type = "boolean", default = true,
                       description = "remove the Authorization header from the request sent upstream" },
  anonymous = { type = "string", required = false,
                description = "consumer name used when credentials are missing or wrong, instead of answering 401" },
  realm = { type = "string", default = "weir", description = "realm sent in WWW-Authenticate on a 401" },
  run_on_preflight = { type = "boolean", default = true,
                       description = "also authenticate CORS preflight (OPTIONS) requests" },
  cache_ttl = { type = "number", default = 30, min = 0, max = 3600,
                description = "seconds a successful password check is remembered (per event loop); 0 checks every request" },
} }
