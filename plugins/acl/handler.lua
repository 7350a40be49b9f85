-- acl: lets a request through by the groups (consumers[].groups) of the
-- consumer an auth plugin identified. It runs after the auth plugins
-- (lower priority), so it sees their verdict.
local weir = require "weir"

local ACL = { PRIORITY = 950, VERSION = "1.0.0" }

-- Groups and the configured lists are short: a nested scan is cheaper than
-- building a set per request.
local function any_in(groups, list)
  for _, group in ipairs(groups) do
    for _, listed in ipairs(list) do
      if group == listed then return true end
    end
  end
  return false
end

function ACL:request(conf, ctx)
  if (conf.allow == nil) == (conf.deny == nil) then
    error("acl: set exactly one of allow and deny")
  end
  local groups = weir.client.get_consumer_groups()
  if not groups then
    -- No auth plugin identified anyone: the client must authenticate first.
    return 401, { message = "Unauthorized" }
  end
  local permitted
  if conf.allow then permitted = any_in(groups, conf.allow)
  else permitted = not any_in(groups, conf.deny) end
  if not permitted then
    return 403, { message = "You cannot consume this service" }
  end
  if conf.hide_groups_header or #groups == 0 then
    weir.upstream.request.clear_header("x-consumer-groups")
  else
    weir.upstream.request.set_header("x-consumer-groups", table.concat(groups, ", "))
  end
end

return ACL
