local ALGORITHMS = { "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256" }

local function names(default, description)
  return { type = "array", elements = { type = "string", min = 1 }, default = default, description = description }
end

return {
  -- consumer_claim_name only means something in JWKS mode.
  required_when = { { field = "jwks_uri", when = "consumer_claim_name" } },
  fields = {
  uri_param_names = names({ "jwt" }, "query arguments the token may arrive in"),
  cookie_names = names({}, "cookies the token may arrive in"),
  header_names = names({ "authorization" }, "headers carrying 'Bearer <token>'"),
  claims_to_verify = { type = "array", elements = { type = "string", one_of = { "exp", "nbf" } }, default = {},
                       description = "registered claims that must be present (exp and nbf are checked whenever present)" },
  maximum_expiration = { type = "number", min = 0, max = 31536000, default = 0,
                         description = "if > 0: exp is required and may be at most this many seconds ahead" },
  clock_skew = { type = "number", min = 0, max = 3600, default = 0,
                 description = "seconds of leeway when checking exp and nbf" },
  key_claim_name = { type = "string", min = 1, default = "iss",
                     description = "claim (or header field) naming the consumer credential's key" },
  secret_is_base64 = { type = "boolean", default = false,
                       description = "HMAC secrets in credentials are base64 encoded" },
  allowed_algorithms = { type = "array", min = 1, elements = { type = "string", one_of = ALGORITHMS },
                         default = ALGORITHMS, description = "token algorithms accepted ('none' never is)" },
  issuers = { type = "array", elements = { type = "string", min = 1 }, required = false,
              description = "if set, the iss claim must be one of these" },
  audiences = { type = "array", elements = { type = "string", min = 1 }, required = false,
                description = "if set, the aud claim (string or list) must contain one of these" },
  jwks_uri = { type = "string", required = false,
               description = "http:// URL of a JWK Set; when set, tokens are verified with its keys instead of credentials" },
  jwks_refresh_interval = { type = "number", min = 1, max = 86400, default = 300,
                            description = "seconds after which the key set is refreshed (in the background)" },
  jwks_min_refresh_interval = { type = "number", min = 0, max = 3600, default = 10,
                                description = "at most one fetch per this many seconds for a token with an unknown kid" },
  jwks_timeout = { type = "number", min = 0.01, max = 60, default = 2,
                   description = "seconds allowed for one key set fetch" },
  jwks_unavailable_status = { type = "integer", one_of = { 401, 503 }, default = 503,
                              description = "status when no key set was ever fetched (JWKS unreachable)" },
  consumer_claim_name = { type = "string", required = false,
                          description = "JWKS mode: claim whose value names the consumer (must be a configured consumer)" },
  cache_ttl = { type = "number", min = 0, max = 3600, default = 10,
                description = "seconds a verified token skips decoding and the signature check (claims are always re-checked); 0 disables" },
  hide_credentials = { type = "boolean", default = true,
                       description = "remove the token (header, query argument, cookie) from the request sent upstream" },
  anonymous = { type = "string", required = false,
                description = "consumer name used when the token is missing or invalid, instead of answering 401" },
  run_on_preflight = { type = "boolean", default = true,
                       description = "also authenticate CORS preflight (OPTIONS) requests" },
  realm = { type = "string", default = "weir", description = "realm sent in WWW-Authenticate on a 401" },
} }
