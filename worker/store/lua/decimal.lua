-- Exact fixed-point decimal arithmetic on strings with 8 decimals.
-- Lua numbers are doubles and HINCRBY stops at 64-bit integers, too small
-- for balances of 10^12 × 10^8 units, so balances are added digit by digit.
-- Prepended to the scripts that need it (see worker/store/scripts.py).

local function dec_parse(s)
  local sign = 1
  if string.sub(s, 1, 1) == '-' then
    sign = -1
    s = string.sub(s, 2)
  end
  local int, frac = string.match(s, '^(%d*)%.?(%d*)$')
  if int == nil or #frac > 8 then
    error('not a decimal with at most 8 decimals: ' .. s)
  end
  local digits = string.gsub(int .. string.sub(frac .. '00000000', 1, 8), '^0+', '')
  if digits == '' then
    return 1, '0'
  end
  return sign, digits
end

local function mag_cmp(a, b)
  if #a ~= #b then
    return #a < #b and -1 or 1
  end
  if a == b then
    return 0
  end
  return a < b and -1 or 1
end

local function mag_add(a, b)
  local out, carry, i, j = {}, 0, #a, #b
  while i > 0 or j > 0 or carry > 0 do
    local d = carry + (i > 0 and string.byte(a, i) - 48 or 0) + (j > 0 and string.byte(b, j) - 48 or 0)
    out[#out + 1] = d % 10
    carry = math.floor(d / 10)
    i, j = i - 1, j - 1
  end
  local s = string.reverse(table.concat(out))
  s = string.gsub(s, '^0+', '')
  return s == '' and '0' or s
end

-- a - b for magnitudes with a >= b
local function mag_sub(a, b)
  local out, borrow, i, j = {}, 0, #a, #b
  while i > 0 do
    local d = (string.byte(a, i) - 48) - borrow - (j > 0 and string.byte(b, j) - 48 or 0)
    if d < 0 then
      d = d + 10
      borrow = 1
    else
      borrow = 0
    end
    out[#out + 1] = d
    i, j = i - 1, j - 1
  end
  local s = string.gsub(string.reverse(table.concat(out)), '^0+', '')
  return s == '' and '0' or s
end

local function dec_format(sign, digits)
  if #digits < 9 then
    digits = string.rep('0', 9 - #digits) .. digits
  end
  local s = string.sub(digits, 1, #digits - 8) .. '.' .. string.sub(digits, -8)
  if sign < 0 and digits ~= string.rep('0', #digits) then
    s = '-' .. s
  end
  return s
end

local function dec_add(x, y)
  local sx, dx = dec_parse(x)
  local sy, dy = dec_parse(y)
  if sx == sy then
    return dec_format(sx, mag_add(dx, dy))
  end
  local c = mag_cmp(dx, dy)
  if c == 0 then
    return dec_format(1, '0')
  elseif c > 0 then
    return dec_format(sx, mag_sub(dx, dy))
  end
  return dec_format(sy, mag_sub(dy, dx))
end
