-- jwt: authenticates requests by a JSON Web Token (RFC 7519, JWS compact
-- form) signed with HS256/384/512, RS256/384/512, PS256/384/512,
-- ES256/384/512 or EdDSA (Ed25519).
--
-- Keys come either from consumers[].credentials.jwt[] = { key, algorithm,
-- secret | rsa_public_key } (the credential is found by the token's
-- `key_claim_name` claim, default iss, with a hash lookup), or, when
-- `jwks_uri` is set, from a JWK Set fetched over HTTP (by kid), cached per
-- Lua state, refreshed in the background and on an unknown kid (rate
-- limited); a failed fetch keeps the last good keys.
local weir = require "weir"
local json, crypto = weir.json, weir.crypto

local JWT = { PRIORITY = 1450, VERSION = "1.0.0" }

-- alg -> how it is verified, and the JWK kty/crv its key must have.
-- Anything else (notably "none") is refused. Each weir.crypto scheme fixes
-- the key type too, so a PEM key of another type never verifies.
local ALGS = {
  HS256 = { hmac = "sha256" }, HS384 = { hmac = "sha384" }, HS512 = { hmac = "sha512" },
  RS256 = { scheme = "rsa-pkcs1-sha256", kty = "RSA" },
  RS384 = { scheme = "rsa-pkcs1-sha384", kty = "RSA" },
  RS512 = { scheme = "rsa-pkcs1-sha512", kty = "RSA" },
  PS256 = { scheme = "rsa-pss-sha256", kty = "RSA" },
  PS384 = { scheme = "rsa-pss-sha384", kty = "RSA" },
  PS512 = { scheme = "rsa-pss-sha512", kty = "RSA" },
  ES256 = { scheme = "ecdsa-p256-sha256", kty = "EC", crv = "P-256" },
  ES384 = { scheme = "ecdsa-p384-sha384", kty = "EC", crv = "P-384" },
  ES512 = { scheme = "ecdsa-p521-sha512", kty = "EC", crv = "P-521" },
  EdDSA = { scheme = "ed25519", kty = "OKP", crv = "Ed25519" },
}

local function unauthorized(conf, message)
  return 401, { message = message }, { ["www-authenticate"] = 'Bearer realm="' .. conf.realm .. '"' }
end

-- Token sources ----------------------------------------------------------------

local function cookies()
  local header = weir.request.get_header("cookie")
  local jar = {}
  if not header then return jar end
  for pair in header:gmatch("[^;]+") do
    local name, value = pair:match("^%s*([^=]-)%s*=%s*(.-)%s*$")
    if name and jar[name] == nil then jar[name] = value end
  end
  return jar
end

-- All distinct tokens found (Kong refuses a request carrying two different ones).
local function find_tokens(conf)
  local seen, list = {}, {}
  local function add(t)
    if t and t ~= "" and not seen[t] then seen[t] = true; list[#list + 1] = t end
  end
  for _, name in ipairs(conf.uri_param_names) do
    local v = weir.request.get_query_arg(name)
    if type(v) == "string" then add(v) end
  end
  if #conf.cookie_names > 0 then
    local jar = cookies()
    for _, name in ipairs(conf.cookie_names) do add(jar[name]) end
  end
  for _, name in ipairs(conf.header_names) do
    local v = weir.request.get_header(name)
    if v then add(v:match("^%s*[Bb][Ee][Aa][Rr][Ee][Rr]%s+(%S+)%s*$")) end
  end
  return list
end

local function hide(conf)
  for _, name in ipairs(conf.header_names) do weir.upstream.request.clear_header(name) end
  local query = weir.upstream.request.get_query()
  local changed = false
  for _, name in ipairs(conf.uri_param_names) do
    if query[name] ~= nil then query[name] = nil; changed = true end
  end
  if changed then weir.upstream.request.set_query(next(query) and query or nil) end
  if #conf.cookie_names > 0 and weir.request.get_header("cookie") then
    local drop = {}
    for _, name in ipairs(conf.cookie_names) do drop[name] = true end
    local kept = {}
    for pair in weir.request.get_header("cookie"):gmatch("[^;]+") do
      local name = pair:match("^%s*([^=]-)%s*=")
      if not (name and drop[name]) then kept[#kept + 1] = pair:match("^%s*(.-)%s*$") end
    end
    if #kept > 0 then weir.upstream.request.set_header("cookie", table.concat(kept, "; "))
    else weir.upstream.request.clear_header("cookie") end
  end
end

-- Decoding -----------------------------------------------------------------------

local function decode_part(part)
  local raw = crypto.base64_decode(part)
  if not raw then return nil end
  local value = json.decode(raw)
  if type(value) ~= "table" or value[1] ~= nil then return nil end   -- a JSON object
  return value
end

-- -> { header, claims, signing_input, signature } or nil, reason
local function decode(token)
  local h64, p64, s64 = token:match("^([%w_-]+)%.([%w_-]+)%.([%w_-]*)$")
  if not h64 then return nil, "Bad token; invalid JWT" end
  local header, claims = decode_part(h64), decode_part(p64)
  if not header then return nil, "Bad token; invalid JSON header" end
  if not claims then return nil, "Bad token; invalid JSON claims" end
  local signature = crypto.base64_decode(s64)
  if not signature then return nil, "Bad token; invalid signature encoding" end
  return { header = header, claims = claims, signing_input = h64 .. "." .. p64, signature = signature }
end

-- Checks ---------------------------------------------------------------------------

local function allowed_alg(conf, alg)
  if type(alg) ~= "string" or not ALGS[alg] then return false end
  for _, a in ipairs(conf.allowed_algorithms) do if a == alg then return true end end
  return false
end

local function verify_with(jwt, alg, key)
  local spec = ALGS[alg]
  if spec.hmac then
    return crypto.constant_time_equals(crypto.hmac(spec.hmac, key, jwt.signing_input), jwt.signature)
  end
  local ok, err = crypto.verify(spec.scheme, key, jwt.signing_input, jwt.signature)
  if ok == nil then weir.log.warn("jwt: ", err) end
  return ok == true
end

local function contains(list, value)
  for _, v in ipairs(list) do if v == value then return true end end
  return false
end

-- Registered claims; returns nil or the reason to refuse.
local function check_claims(conf, claims)
  local now = weir.time.now()
  for _, name in ipairs(conf.claims_to_verify) do
    if claims[name] == nil then return "token has no '" .. name .. "' claim" end
  end
  local exp, nbf = claims.exp, claims.nbf
  if exp ~= nil then
    if type(exp) ~= "number" then return "'exp' must be a number" end
    if now - conf.clock_skew >= exp then return "token expired" end
  end
  if nbf ~= nil then
    if type(nbf) ~= "number" then return "'nbf' must be a number" end
    if now + conf.clock_skew < nbf then return "token not valid yet" end
  end
  if conf.maximum_expiration > 0 then
    if type(exp) ~= "number" then return "token has no 'exp' claim" end
    if exp - now > conf.maximum_expiration then return "'exp' exceeds the maximum allowed expiration" end
  end
  if conf.issuers and not contains(conf.issuers, claims.iss) then return "token issuer not allowed" end
  if conf.audiences then
    local aud = claims.aud
    local ok = false
    if type(aud) == "string" then ok = contains(conf.audiences, aud)
    elseif type(aud) == "table" then
      for _, a in ipairs(aud) do if contains(conf.audiences, a) then ok = true; break end end
    end
    if not ok then return "token audience not allowed" end
  end
  return nil
end

-- Keys from credentials --------------------------------------------------------------

-- -> consumer or nil, reason
local function verify_by_credential(conf, jwt)
  local alg = jwt.header.alg
  local key_value = jwt.claims[conf.key_claim_name]
  if key_value == nil then key_value = jwt.header[conf.key_claim_name] end
  if type(key_value) ~= "string" then return nil, "No mandatory '" .. conf.key_claim_name .. "' in claims" end
  local consumer, credential = weir.client.find_credential("jwt", "key", key_value)
  if not consumer then return nil, "No credentials found for given '" .. conf.key_claim_name .. "'" end
  -- The credential fixes the algorithm: an RS256 key is never used as an HMAC secret.
  if (credential.algorithm or "HS256") ~= alg then return nil, "Invalid algorithm" end
  local key
  if ALGS[alg].hmac then
    key = credential.secret
    if type(key) ~= "string" then return nil, "Invalid key/secret" end
    if conf.secret_is_base64 then
      key = crypto.base64_decode(key)
      if not key then return nil, "Invalid key/secret" end
    end
  else
    key = credential.rsa_public_key or credential.public_key
    if type(key) ~= "string" then return nil, "Invalid key/secret" end
  end
  if not verify_with(jwt, alg, key) then return nil, "Invalid signature" end
  return consumer
end

-- Keys from a JWK Set ----------------------------------------------------------------

-- Per Lua state (one per event loop): uri -> { list, by_kid, fetched_at,
-- last_attempt, fetching }. Lost on reload (a new generation fetches anew).
local key_sets = {}

local function key_set(uri)
  local set = key_sets[uri]
  if not set then
    set = { list = nil, by_kid = {}, fetched_at = nil, last_attempt = nil, fetching = false }
    key_sets[uri] = set
  end
  return set
end

-- Fetches and installs the key set; on any failure the old keys stay.
local function fetch(conf, set)
  set.fetching = true
  set.last_attempt = weir.time.monotonic()
  local res, err = weir.http.request(conf.jwks_uri, {
    timeout = conf.jwks_timeout, max_body = 1048576, headers = { accept = "application/json" },
    ssl_verify = conf.jwks_ssl_verify, ca_file = conf.jwks_ca_file })
  set.fetching = false
  if not res then weir.log.warn("jwt: JWKS fetch from ", conf.jwks_uri, " failed: ", err); return false end
  if res.status ~= 200 then weir.log.warn("jwt: JWKS fetch from ", conf.jwks_uri, " answered ", res.status); return false end
  local doc, derr = json.decode(res.body)
  if type(doc) ~= "table" or type(doc.keys) ~= "table" then
    weir.log.warn("jwt: JWKS from ", conf.jwks_uri, " is not a key set: ", derr or "no 'keys' list"); return false
  end
  local list, by_kid = {}, {}
  for _, k in ipairs(doc.keys) do
    if type(k) == "table" and (k.kty == "RSA" or k.kty == "EC" or k.kty == "OKP") and (k.use == nil or k.use == "sig") then
      list[#list + 1] = k
      if type(k.kid) == "string" then by_kid[k.kid] = k end
    end
  end
  if #list == 0 then weir.log.warn("jwt: JWKS from ", conf.jwks_uri, " has no usable signing keys"); return false end
  set.list, set.by_kid, set.fetched_at = list, by_kid, weir.time.monotonic()
  return true
end

-- Waits (yielding) for a fetch another request of this state started.
local function await_fetch(conf, set)
  local deadline = weir.time.monotonic() + conf.jwks_timeout + 0.5
  while set.fetching and weir.time.monotonic() < deadline do weir.sleep(0.01) end
end

local function ensure_keys(conf, set)
  if set.fetching then await_fetch(conf, set) end
  if set.list then
    if weir.time.monotonic() - set.fetched_at >= conf.jwks_refresh_interval and not set.fetching then
      -- Stale: refresh in the background; this request uses the keys it has.
      set.fetching = true
      weir.timer.at(0, function() fetch(conf, set) end)
    end
    return true
  end
  if not set.fetching then fetch(conf, set) else await_fetch(conf, set) end
  return set.list ~= nil
end

local function usable(jwk, alg)
  local spec = ALGS[alg]
  return jwk.kty == spec.kty and (spec.crv == nil or jwk.crv == spec.crv) and (jwk.alg == nil or jwk.alg == alg)
end

-- -> true or nil, reason, status
local function verify_by_jwks(conf, jwt)
  local alg = jwt.header.alg
  if ALGS[alg].hmac then return nil, "Invalid algorithm" end      -- JWKS keys are public keys only
  local set = key_set(conf.jwks_uri)
  if not ensure_keys(conf, set) then return nil, "JWKS unavailable", conf.jwks_unavailable_status end
  local kid = jwt.header.kid
  if kid ~= nil then
    if type(kid) ~= "string" then return nil, "Bad token; invalid kid" end
    local jwk = set.by_kid[kid]
    if not jwk and not set.fetching and weir.time.monotonic() - set.last_attempt >= conf.jwks_min_refresh_interval then
      fetch(conf, set)                                            -- key rotation: a new kid
      jwk = set.by_kid[kid]
    end
    if not jwk then return nil, "No key found for kid '" .. kid .. "'" end
    if not usable(jwk, alg) then return nil, "Invalid algorithm" end
    if verify_with(jwt, alg, jwk) then return true end
    return nil, "Invalid signature"
  end
  for _, jwk in ipairs(set.list) do
    if usable(jwk, alg) and verify_with(jwt, alg, jwk) then return true end
  end
  return nil, "Invalid signature"
end

-- The phase ---------------------------------------------------------------------------


-- Tokens that passed decoding, the signature and the key lookup, per plugin
-- config (conf tables live as long as this Lua state: one per event loop
-- and generation, so a reload starts empty). A hit skips base64/JSON
-- decoding and the signature check (most of this plugin's cost, and an
-- RSA/ECDSA verify per request otherwise); the claims are still checked on
-- every request, so an expired token fails on time. Keyed by the exact token
-- text: any change to it is a miss.
local function shallow_copy(t)
  local copy = {}
  for k, v in pairs(t) do copy[k] = v end
  return copy
end

local verified_tokens = setmetatable({}, { __mode = "k" })   -- conf -> { token -> entry }
local VERIFIED_MAX = 10000                                    -- per conf; dropped when full

local function token_cache(conf)
  local cache = verified_tokens[conf]
  if not cache then cache = { count = 0, entries = {} }; verified_tokens[conf] = cache end
  return cache
end

-- -> consumer (or false when verified without one), or nil, reason, status
local function authenticate(conf, token, ctx)
  local cache, now
  if conf.cache_ttl > 0 then
    cache, now = token_cache(conf), weir.time.monotonic()
    local hit = cache.entries[token]
    if hit and hit.expires > now then
      local claim_err = check_claims(conf, hit.jwt.claims)
      if claim_err then return nil, claim_err end
      ctx.jwt = { header = hit.jwt.header, claims = shallow_copy(hit.jwt.claims) }
      return hit.consumer
    end
  end
  local jwt, err = decode(token)
  if not jwt then return nil, err end
  if not allowed_alg(conf, jwt.header.alg) then return nil, "Invalid algorithm" end
  local consumer = false
  if conf.jwks_uri then
    local ok, reason, status = verify_by_jwks(conf, jwt)
    if not ok then return nil, reason, status end
    if conf.consumer_claim_name then
      local name = jwt.claims[conf.consumer_claim_name]
      if type(name) ~= "string" or not weir.client.is_consumer(name) then
        return nil, "No consumer found for given '" .. conf.consumer_claim_name .. "'"
      end
      consumer = name
    end
  else
    consumer, err = verify_by_credential(conf, jwt)
    if not consumer then return nil, err end
  end
  local claim_err = check_claims(conf, jwt.claims)
  if claim_err then return nil, claim_err end
  ctx.jwt = { header = jwt.header, claims = shallow_copy(jwt.claims) }
  if cache then
    if cache.count >= VERIFIED_MAX then cache.count, cache.entries = 0, {} end
    if not cache.entries[token] then cache.count = cache.count + 1 end
    -- The cache keeps its own claims table: what later plugins do to ctx.jwt cannot change it.
    cache.entries[token] = { consumer = consumer, jwt = jwt, expires = now + conf.cache_ttl }
  end
  return consumer
end

function JWT:request(conf, ctx)
  if not conf.run_on_preflight and weir.request.get_method() == "OPTIONS" then return end
  -- Another auth plugin already identified the client (multiple auth with anonymous).
  if conf.anonymous and weir.client.get_consumer() and weir.client.get_consumer() ~= conf.anonymous then return end

  local tokens = find_tokens(conf)
  local consumer, reason, status
  if #tokens == 1 then
    consumer, reason, status = authenticate(conf, tokens[1], ctx)
  elseif #tokens > 1 then
    reason = "Multiple tokens provided"
  else
    reason = "Unauthorized"
  end
  if conf.hide_credentials then hide(conf) end

  if consumer ~= nil then
    if consumer then
      weir.client.identify(consumer, "jwt")
    else
      weir.upstream.request.clear_header("x-anonymous-consumer")
    end
    return
  end
  if status == 503 then return 503, { message = reason } end
  if conf.anonymous then
    weir.client.identify(conf.anonymous, nil, true)
    return
  end
  return unauthorized(conf, reason)
end

return JWT
