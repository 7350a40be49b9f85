-- basic-auth: HTTP Basic authentication (RFC 7617) against
-- consumers[].credentials["basic-auth"][] = { username, password }.
-- Passwords reach this plugin only as PBKDF2-HMAC-SHA256 hashes
-- ("pbkdf2-sha256$iterations$salt$hash": plain ones are hashed when the
-- config loads), the username is a hash lookup (weir.client.find_credential),
-- and the derived key is compared in constant time.
local weir = require "weir"
local crypto = weir.crypto

local BasicAuth = { PRIORITY = 1100, VERSION = "1.0.0" }

-- PBKDF2 is deliberately slow (milliseconds), so a successful check is
-- remembered for conf.cache_ttl seconds in this Lua state. The cache key is
-- an HMAC (under a random per-state key) of the username, the password *and*
-- the stored hash: a wrong password never maps to a remembered success, and
-- a changed credential (new hash after a reload) is checked afresh.
local cache_key = crypto.random_bytes(32)
local verified = {}          -- HMAC -> expiry (monotonic seconds)
local verified_count = 0
local VERIFIED_MAX = 10000   -- per state; the table is dropped when full

local function unauthorized(conf, message)
  return 401, { message = message }, { ["www-authenticate"] = 'Basic realm="' .. conf.realm .. '"' }
end

-- "Basic <base64(user:pass)>" -> user, pass; nil when absent or malformed.
local function parse_authorization(value)
  if not value then return nil end
  local encoded = value:match("^%s*[Bb][Aa][Ss][Ii][Cc]%s+([%w+/=_-]+)%s*$")
  if not encoded then return nil end
  local decoded = crypto.base64_decode(encoded)
  if not decoded then return nil end
  local user, pass = decoded:match("^([^:]*):(.*)$")
  return user, pass
end

-- An unknown username must cost what a known one costs, or response times
-- tell which usernames exist: it is checked against this dummy credential
-- (random salt and key, so it never matches) with the iteration count of the
-- last real credential checked here (the load-time default, 10,000, before
-- any), which is the count a real user's check most likely costs.
local dummy_salt, dummy_key = crypto.random_bytes(16), crypto.random_bytes(32)
local last_iterations = 10000

local function check_password(stored, password)
  local iterations, salt64, hash64 = stored:match("^pbkdf2%-sha256%$(%d+)%$([^$]+)%$([^$]+)$")
  if not iterations then return false end
  local salt, want = crypto.base64_decode(salt64), crypto.base64_decode(hash64)
  if not salt or not want then return false end
  last_iterations = math.tointeger(tonumber(iterations))
  local got = crypto.pbkdf2(password, salt, last_iterations, #want)
  return crypto.constant_time_equals(got, want)
end

local function check_unknown_user(password)
  local got = crypto.pbkdf2(password, dummy_salt, last_iterations, #dummy_key)
  crypto.constant_time_equals(got, dummy_key)
  weir.metrics.count("unknown_username_checks")
  return false
end

local function verify(conf, username, password, stored)
  if conf.cache_ttl <= 0 then return check_password(stored, password) end
  local id = crypto.hmac_sha256(cache_key, #username .. ":" .. username .. #password .. ":" .. password .. stored)
  local now = weir.time.monotonic()
  local expiry = verified[id]
  if expiry and expiry > now then return true end
  if not check_password(stored, password) then return false end
  if verified_count >= VERIFIED_MAX then verified, verified_count = {}, 0 end
  if not expiry then verified_count = verified_count + 1 end
  verified[id] = now + conf.cache_ttl
  return true
end


function BasicAuth:request(conf, ctx)
  if not conf.run_on_preflight and weir.request.get_method() == "OPTIONS" then return end
  -- Another auth plugin already identified the client (multiple auth with anonymous).
  if conf.anonymous and weir.client.get_consumer() and weir.client.get_consumer() ~= conf.anonymous then return end

  local header = weir.request.get_header("authorization")
  local username, password = parse_authorization(header)
  local consumer
  if username then
    local found, credential = weir.client.find_credential("basic-auth", "username", username)
    if not (found and type(credential.password) == "string") then
      check_unknown_user(password)
    elseif verify(conf, username, password, credential.password) then
      consumer = found
    end
  end
  if conf.hide_credentials then weir.upstream.request.clear_header("authorization") end

  if consumer then
    weir.client.identify(consumer, "basic-auth")
    return
  end
  if conf.anonymous then
    weir.client.identify(conf.anonymous, nil, true)
    return
  end
  if not header then return unauthorized(conf, "No credentials found in request") end
  return unauthorized(conf, "Invalid authentication credentials")
end

return BasicAuth
